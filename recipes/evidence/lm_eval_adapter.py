"""EleutherAI lm-evaluation-harness adapter: evaluate a recipes checkpoint on GSM8k, MATH, HumanEval, ...

``NexusLM`` is an ``lm_eval`` model registered as ``lightning_nexus``. It wraps a recipes GPT/Llama
(``model(input_ids [B, T]) -> logits [B, T, V]``) and a lightning_nexus tokenizer, and implements the
three request types of the harness: ``loglikelihood`` (multiple-choice tasks), ``loglikelihood_rolling``
(perplexity tasks) and ``generate_until`` (GSM8k, MATH, HumanEval; greedy decoding only).

lm-eval is an optional dependency: ``pip install -e '.[eval]'``. The harness CLI only knows models
registered in its own process, so run it through this module, which registers ``lightning_nexus`` and
then hands all arguments to lm-eval's own CLI (every ``lm_eval`` flag works)::

    python -m lightning_nexus_recipes.evidence.lm_eval_adapter --model lightning_nexus \\
        --model_args checkpoint=PATH/TO/last.ckpt,tokenizer=byte,device=cpu,batch_size=8 \\
        --tasks gsm8k --limit 100 --output_path runs/lm_eval

``tokenizer`` is ``byte`` or the path of the BPE ``tokenizer.json`` the model was trained with (the
corpus cache keeps it). Benchmarks downloaded beforehand are read from the HuggingFace cache: set
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1`` on machines without internet; a local task YAML directory
is added with ``--include_path DIR``. Values given in ``--model_args`` win over the CLI's
``--batch_size``/``--device``. Task-specific needs come from lm-eval, not this adapter: the MATH tasks
(``minerva_math``) need ``pip install 'lm-eval[math]'``; HumanEval runs generated code
(``HF_ALLOW_CODE_EVAL=1`` and ``--confirm_run_unsafe_code``) and loads the ``code_eval`` metric with
HF ``evaluate``, which must already be in the local cache when offline. Tasks that sample
(``do_sample: true``, e.g. ``humaneval_64``) are refused: decoding here is greedy.

In Python (tests, the evidence runner), with a model in memory::

    >>> import lm_eval
    >>> from lightning_nexus.data.tokenizer import ByteTokenizer
    >>> from lightning_nexus_recipes.models import GPT, GPTConfig
    >>> lm = NexusLM(model=GPT(GPTConfig(size="tiny")), tokenizer=ByteTokenizer(), device="cpu")
    >>> lm.max_length
    256
    >>> results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], limit=10)  # doctest: +SKIP

Contexts longer than the model's context window are truncated on the left; generation slides the
window, so a long prompt keeps as much context as fits. Requests are batched with right padding,
which causal models never attend to.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nexus.data.tokenizer import BPETokenizer, ByteTokenizer
from lightning_nexus_recipes.evidence.modes import eval_mode

try:
    import lm_eval.models  # noqa: F401  (fills the registry's built-in names before ours, see _register)
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
except ImportError as err:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "lightning_nexus_recipes.evidence.lm_eval_adapter needs EleutherAI's lm-eval: pip install -e '.[eval]'"
    ) from err

MODEL_NAME = "lightning_nexus"
Tokenizer = ByteTokenizer | BPETokenizer


class NexusLM(TemplateLM):
    """A recipes GPT/Llama as an ``lm_eval`` model. Give either ``checkpoint`` or ``model``.

    Example::

        >>> from lightning_nexus_recipes.models import GPT, GPTConfig
        >>> lm = NexusLM(model=GPT(GPTConfig(size="tiny")), tokenizer="byte", device="cpu", batch_size=4)
        >>> logprob, is_greedy = lm.loglikelihood_pairs([("2+2=", "4")])[0]
        >>> logprob < 0
        True

    Args:
        checkpoint: a ``CausalLMModule`` Lightning checkpoint (``.ckpt`` file).
        model: an in-memory model instead (``CausalLMModule`` or a bare GPT/Llama); its train/eval modes
            are restored after every call, so it can be evaluated in the middle of training.
        tokenizer: ``"byte"``, the path of a BPE ``tokenizer.json``, or a tokenizer object.
        device: where the model runs (``cuda`` when available, else ``cpu``). An in-memory model is
            moved there (and cast, with ``dtype``) in place.
        batch_size: requests per forward pass (an integer; no automatic sizing).
        max_length: context window; defaults to the model's ``config.block_size``.
        max_gen_toks: generation length when a task does not set ``max_gen_toks``.
        dtype: cast the weights, e.g. ``bfloat16`` on GPUs (``None`` keeps them as they are).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model: nn.Module | None = None,
        tokenizer: str | Path | Tokenizer = "byte",
        device: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ValueError("NexusLM: give exactly one of checkpoint=PATH or model=<nn.Module>")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = _load_checkpoint(checkpoint) if checkpoint is not None else _unwrap(model)
        if dtype is not None:
            net = net.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        self.model = net.to(self._device)
        # Not `self.tokenizer`: lm_eval reads that attribute as a HuggingFace tokenizer (chat templates).
        self.text_tokenizer = _make_tokenizer(tokenizer)
        config: Any = self.model.config  # GPTConfig / LlamaConfig, checked by _unwrap / _load_checkpoint
        self.max_length = int(max_length or config.block_size)
        self.batch_size = _parse_batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        model_vocab = getattr(self.model.config, "vocab_size", None)
        if model_vocab is not None and self.text_tokenizer.vocab_size != model_vocab:
            warnings.warn(
                f"NexusLM: tokenizer vocab {self.text_tokenizer.vocab_size} != model vocab {model_vocab}; "
                "is this the tokenizer the model was trained with?",
                stacklevel=2,
            )

    # ------------------------------------------------------------ harness hooks
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> NexusLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> NexusLM:
        # The CLI always passes its own batch_size (default 1) next to --model_args; the harness would
        # raise on the duplicate key, so the more specific --model_args value wins. max_batch_size only
        # bounds automatic batch sizing, which this adapter does not do.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "max_batch_size"}
        return cls(**{**extra, **arg_dict})

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eod_id

    @property
    def tokenizer_name(self) -> str:
        return self.text_tokenizer.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # encode_docs appends exactly one end-of-document id; a prompt is not a finished document.
        return self.text_tokenizer.encode_docs([string])[:-1].astype("int64").tolist()

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    # ------------------------------------------------------------ scoring
    def loglikelihood_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), is_greedy)`` for plain ``(context, continuation)`` strings."""
        requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        return self.loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = self._score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of the context length; the first token
        is predicted from the end-of-document id, as after the previous document in training."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    @torch.no_grad()
    def _score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of continuation log-probabilities and whether each continuation token is the argmax."""
        for _, cont in pairs:
            if not 0 < len(cont) <= self.max_length:
                raise ValueError(
                    f"NexusLM: continuation of {len(cont)} tokens; need 1..{self.max_length} (context length)"
                )
        # Predicting token t needs tokens < t as input: keep the last max_length+1, feed all but the last.
        rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        with eval_mode(self.model):
            for idx, ids in self._batches(rows):
                logits = self.model(ids)
                for b, i in enumerate(idx):
                    cont = pairs[i][1]
                    end = len(rows[i])
                    # Only the continuation's rows: a full [B, T, V] float log-softmax is GBs at 32k vocab.
                    lp = F.log_softmax(logits[b, end - len(cont) : end].float(), dim=-1)
                    target = torch.tensor(cont, device=lp.device)
                    total = lp.gather(1, target[:, None]).sum().item()
                    out[i] = (total, bool((lp.argmax(-1) == target).all()))
        return out

    # ------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string (``until``), at the end-of-document
        token or after ``max_gen_toks`` tokens."""
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._gen_settings(req.args[1]), []).append(i)
        for (until, max_gen_toks), members in groups.items():
            contexts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in members]
            for i, text in zip(members, self._generate(contexts, list(until), max_gen_toks)):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
        if gen_kwargs.get("do_sample"):
            # Sampled metrics (pass@k with repeats) would be silently wrong under greedy decoding.
            raise ValueError("NexusLM decodes greedily; this task asks for do_sample=True (use a greedy task variant)")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        return tuple(until), int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))

    @torch.no_grad()
    def _generate(self, contexts: list[list[int]], until: list[str], max_gen_toks: int) -> list[str]:
        seqs = [list(c) for c in contexts]
        generated: list[list[int]] = [[] for _ in contexts]
        active = list(range(len(contexts)))
        with eval_mode(self.model):
            for _ in range(max_gen_toks):
                if not active:
                    break
                # The window slides: each step sees the last max_length tokens (no KV cache to outgrow).
                rows = [seqs[i][-self.max_length :] for i in active]
                finished: set[int] = set()
                for idx, ids in self._batches(rows):
                    logits = self.model(ids)
                    for b, j in enumerate(idx):
                        i = active[j]
                        token = int(logits[b, len(rows[j]) - 1].argmax())
                        if token == self.eot_token_id:
                            finished.add(i)
                            continue
                        seqs[i].append(token)
                        generated[i].append(token)
                        if any(stop in self.tok_decode(generated[i]) for stop in until):
                            finished.add(i)
                active = [i for i in active if i not in finished]
        return [_cut(self.tok_decode(g), until) for g in generated]

    # ------------------------------------------------------------ batching
    def _batches(self, rows: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Right-padded batches, longest rows first so each batch holds similar lengths. Padding sits
        after the scored positions, which a causal model cannot see."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids = torch.full((len(idx), len(rows[idx[0]])), self.eot_token_id, dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            yield idx, ids.to(self._device)


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest stop string."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


def _unwrap(model: nn.Module | None) -> nn.Module:
    # A CausalLMModule holds the network in .model; bare GPT/Llama carry .config.block_size themselves.
    inner = getattr(model, "model", False)
    if inner is None:
        raise ValueError("NexusLM: the CausalLMModule has no network yet; call module.configure_model() first")
    net = inner if isinstance(inner, nn.Module) else model
    if net is None or not hasattr(getattr(net, "config", None), "block_size"):
        raise TypeError(f"NexusLM: expected a recipes GPT/Llama or CausalLMModule, got {type(model).__name__}")
    return net


def _load_checkpoint(path: str | Path) -> nn.Module:
    from lightning_nexus_recipes.module import CausalLMModule

    # Compilation and activation checkpointing are training switches; evaluation wants neither.
    module = CausalLMModule.load_from_checkpoint(
        str(path), map_location="cpu", weights_only=False, compile=False, activation_checkpointing=False
    )
    return _unwrap(module)


def _make_tokenizer(tokenizer: str | Path | Tokenizer) -> Tokenizer:
    if isinstance(tokenizer, (ByteTokenizer, BPETokenizer)):
        return tokenizer
    if str(tokenizer) == "byte":
        return ByteTokenizer()
    return BPETokenizer(tokenizer)


def _parse_batch_size(batch_size: int | str) -> int:
    if isinstance(batch_size, str) and not batch_size.isdigit():
        raise ValueError(f"NexusLM: batch_size={batch_size!r}; give an integer (automatic sizing is not supported)")
    if int(batch_size) < 1:
        raise ValueError(f"NexusLM: batch_size={batch_size} must be >= 1")
    return int(batch_size)


def _register() -> None:
    # `python -m` runs this file as __main__, and anything importing recipes.evidence.lm_eval_adapter
    # loads it a second time: register once. lm_eval.models (imported above) has already filled in the
    # built-in names, which lm_eval only adds by itself while the registry is empty.
    if MODEL_NAME not in MODEL_REGISTRY:
        register_model(MODEL_NAME)(NexusLM)


_register()


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with ``lightning_nexus`` registered (arguments as for ``lm_eval``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is None:
        cli_evaluate()
        return
    # lm_eval's CLI parses (and edits) sys.argv itself.
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
