"""The lm-evaluation-harness adapter (recipes/evidence/lm_eval_adapter.py), fully offline.

Local tasks (a JSONL file and a task YAML written into tmp_path) run through ``lm_eval.simple_evaluate``
and lm-eval's CLI; every number the harness reports is recomputed here from plain model forwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

# Before lm_eval (and so HF datasets) is imported: both read these once, at import.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lm_eval
import lm_eval.evaluator
import lm_eval.tasks
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lm_eval.api.instance import Instance
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_nexus_recipes.evidence import lm_eval_adapter
from lightning_nexus_recipes.evidence.lm_eval_adapter import MODEL_NAME, NexusLM
from lightning_nexus_recipes.models import GPT, GPTConfig
from lightning_nexus_recipes.module import CausalLMModule

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open an internet connection, and skip lm_eval's environment report
    (``torch.utils.collect_env`` spawns pip and takes ~10 s; it is not what these tests check)."""
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"lm_eval tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)


def tiny_gpt(block_size: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(size="tiny", vocab_size=256, block_size=block_size)).eval()


class ByteCounter(nn.Module):
    """A fake LM that always predicts the next byte value (``a`` -> ``b``), and end-of-document (0)
    after ``z``, so generations are known in advance. Records the longest input it was given."""

    def __init__(self, block_size: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=256)
        self.longest = 0

    def forward(self, ids: Tensor) -> Tensor:
        self.longest = max(self.longest, ids.shape[1])
        nxt = torch.where(ids == ord("z"), torch.zeros_like(ids), ids % 255 + 1)
        return F.one_hot(nxt, 256).float() * 30.0


def counted(text: str, n: int) -> str:
    """What ByteCounter generates after ``text`` in ``n`` steps (stopping after ``z``)."""
    out, c = "", ord(text[-1])
    while len(out) < n and c != ord("z"):
        c += 1
        out += chr(c)
    return out


def direct_logprob(model: nn.Module, context: str, continuation: str, block_size: int) -> tuple[float, bool]:
    """Reference: one unbatched forward over the last block_size+1 bytes, log-softmax, sum."""
    ctx = list(context.encode()) or [0]  # an empty context conditions on end-of-document
    cont = list(continuation.encode())
    full = (ctx + cont)[-(block_size + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]])).float()[0], dim=-1)
    rows = logp[len(full) - 1 - len(cont) :]
    target = torch.tensor(cont)
    return rows[torch.arange(len(cont)), target].sum().item(), bool((rows.argmax(-1) == target).all())


def direct_greedy(model: nn.Module, context: str, max_new: int, until: list[str]) -> str:
    """Reference: generate one token at a time, no batching, then cut at the first stop string."""
    ids, new = list(context.encode()), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids[-model.config.block_size :]]))[0, -1].argmax())
            if token == 0:
                break
            ids.append(token)
            new.append(token)
    text = bytes(new).decode("utf-8", errors="replace")
    cuts = [text.find(s) for s in until if s in text]
    return text[: min(cuts)] if cuts else text


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def write_task(root: Path, name: str, docs: list[dict], body: str) -> None:
    """A local task: docs as JSONL and a task YAML reading them with HF datasets' json builder."""
    data = root / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\n" + body
    )


MC_BODY = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""

GEN_BODY = """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["Question:"]
  do_sample: false
  max_gen_toks: 3
metric_list:
  - metric: exact_match
"""

QUESTIONS = ["Which colour is the sky", "Pick one", "2+2=", "A much longer question, to make lengths differ: which?"]
CHOICES = [["red", "green", "blue"], ["cat", "dog", "a mouse"], ["4", "5", "22", "four"], ["yes", "no"]]


def mc_docs(model: nn.Module, block_size: int) -> tuple[list[dict], list[list[float]]]:
    """Multiple-choice docs whose labels agree with the model's direct scoring on even docs only, so
    the accuracy lm_eval must report is exactly 0.5. Also returns the direct log-likelihoods."""
    docs, scores = [], []
    for i, (question, choices) in enumerate(zip(QUESTIONS, CHOICES)):
        # lm_eval scores " " + choice after the question (its default target_delimiter).
        lls = [direct_logprob(model, question, " " + c, block_size)[0] for c in choices]
        best = max(range(len(choices)), key=lls.__getitem__)
        label = best if i % 2 == 0 else (best + 1) % len(choices)
        docs.append({"question": question, "choices": choices, "label": label})
        scores.append(lls)
    return docs, scores


def local_tasks(root: Path) -> lm_eval.tasks.TaskManager:
    # include_defaults=False: indexing lm_eval's ~14k built-in task YAMLs takes 10-30 s.
    return lm_eval.tasks.TaskManager(include_path=str(root), include_defaults=False)


# ------------------------------------------------------------------ loglikelihood
def test_loglikelihood_matches_hand_written_log_softmax_sum() -> None:
    block = 32
    model = tiny_gpt(block_size=block)
    lm = NexusLM(model=model, tokenizer="byte", device="cpu", batch_size=3)
    pairs = [
        ("The quick brown fox", " jumps"),
        ("", "starts a document"),
        ("x" * 100 + " left-truncated context", " end"),  # 100+ bytes > block: left truncation
        ("a", "b"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (ctx, cont), (logprob, is_greedy) in zip(pairs, got):
        want, want_greedy = direct_logprob(model, ctx, cont, block)
        assert logprob == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert is_greedy == want_greedy
    assert lm.loglikelihood_pairs(pairs[:1])[0][0] == pytest.approx(got[0][0], abs=1e-5)
    with pytest.raises(ValueError, match="continuation"):
        lm.loglikelihood_pairs([("ctx", "y" * (block + 1))])  # cannot be scored inside one window


def test_is_greedy_is_true_only_for_the_argmax_continuation() -> None:
    lm = NexusLM(model=ByteCounter(block_size=8), tokenizer="byte", device="cpu", batch_size=2)
    got = lm.loglikelihood_pairs([("abc", "def"), ("abc", "dxf"), ("0123456789abc", "defg")])
    assert [g for _, g in got] == [True, False, True]
    assert got[0][0] == pytest.approx(0.0, abs=1e-3) and got[1][0] < -25


def test_loglikelihood_rolling_scores_every_token_once_in_context_windows() -> None:
    block = 16
    model = tiny_gpt(block_size=block)
    lm = NexusLM(model=model, tokenizer="byte", device="cpu", batch_size=2)
    texts = ["Rolling windows: forty bytes of plain text", "short"]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, value in zip(texts, got):
        x = [0] + list(text.encode())  # end-of-document first: t[j] is predicted from x[:j+1]
        n, want = len(x) - 1, 0.0
        for a in range(0, n, block):  # predict t[a:b] from the last `block` inputs before t[b]
            b = min(a + block, n)
            start = max(0, b - block)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([x[start:b]]))[0], dim=-1)
            want += sum(logp[j - start, x[j + 1]].item() for j in range(a, b))
        assert value == pytest.approx(want, abs=1e-4)
    # A text that fits in one window is scored exactly as a continuation of an empty context.
    assert got[1] == pytest.approx(lm.loglikelihood_pairs([("", texts[1])])[0][0], abs=1e-5)


# ------------------------------------------------------------------ generation
def test_generate_until_stops_at_stop_strings_eod_and_max_gen_toks() -> None:
    model = ByteCounter(block_size=8)
    lm = NexusLM(model=model, tokenizer="byte", device="cpu", batch_size=2)
    cases = [
        (("abc", {"until": ["f"], "max_gen_toks": 50}), "de"),
        (("abc", {"until": ["gh", "e"], "max_gen_toks": 50}), "d"),  # the earliest stop string wins
        (("abc", {"until": ["fg"], "max_gen_toks": 50}), "de"),  # a stop spanning two tokens
        (("abc", {"until": [], "max_gen_toks": 4}), "defg"),
        (("abc", {"until": "e"}), "d"),  # a single string, default max_gen_toks
        (("uvw", {"until": ["\n"], "max_gen_toks": 50}), "xyz"),  # end-of-document stops generation
        (("0123456789ABCDEFGHIJKLMNOPabcdefghijklmnop", {"until": ["t"]}), "qrs"),  # context > window
    ]
    got = lm.generate_until(requests("generate_until", [args for args, _ in cases]))
    assert got == [want for _, want in cases]
    assert model.longest <= 8  # every forward pass was left-truncated to the context window
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(requests("generate_until", [("abc", {"until": ["x"], "do_sample": True})]))


# ------------------------------------------------------------------ through the harness
def test_multiple_choice_accuracy_through_simple_evaluate_matches_direct_scoring(tmp_path: Path) -> None:
    model = tiny_gpt()
    docs, direct = mc_docs(model, block_size=256)
    write_task(tmp_path, "nexus_mc", docs, MC_BODY)
    lm = NexusLM(model=model, tokenizer="byte", device="cpu", batch_size=4)

    out = lm_eval.simple_evaluate(
        model=lm, tasks=["nexus_mc"], task_manager=local_tasks(tmp_path), bootstrap_iters=0, log_samples=True
    )

    assert out["results"]["nexus_mc"]["acc,none"] == 0.5
    for sample in out["samples"]["nexus_mc"]:
        harness = [resp[0][0] for resp in sample["resps"]]
        assert harness == pytest.approx(direct[sample["doc_id"]], abs=1e-4)


def test_generate_until_task_through_simple_evaluate(tmp_path: Path) -> None:
    questions = ["abc", "klm", "pqr", "uvw", "A longer prompt, ends in g"]
    answers = ["def", "nop", "xyz", "xyz", "hij"]  # pqr -> "stu" is the one miss
    write_task(tmp_path, "nexus_gen", [{"question": q, "answer": a} for q, a in zip(questions, answers)], GEN_BODY)
    tasks = local_tasks(tmp_path)

    counter = NexusLM(model=ByteCounter(block_size=8), tokenizer="byte", device="cpu", batch_size=2)
    out = lm_eval.simple_evaluate(model=counter, tasks=["nexus_gen"], task_manager=tasks, bootstrap_iters=0)
    want = sum(counted(q, 3) == a for q, a in zip(questions, answers)) / len(questions)
    assert want == 0.8
    assert out["results"]["nexus_gen"]["exact_match,none"] == want

    # A real transformer: batched, right-padded generation equals one-at-a-time greedy decoding.
    gpt = tiny_gpt()
    lm = NexusLM(model=gpt, tokenizer="byte", device="cpu", batch_size=3)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["nexus_gen"], task_manager=tasks, bootstrap_iters=0, log_samples=True
    )
    for sample in out["samples"]["nexus_gen"]:
        question = questions[sample["doc_id"]]
        assert sample["resps"][0][0] == direct_greedy(gpt, question, 3, ["Question:"])


# ------------------------------------------------------------------ checkpoints and the CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CausalLMModule]:
    """A CausalLMModule checkpoint written by Lightning after one training step."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    module = CausalLMModule(model=GPTConfig(size="tiny", block_size=64), lr=1e-3, warmup_steps=1)
    ids = torch.randint(1, 256, (4, 65))
    rows = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=2))
    path = root / "step1.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_checkpoint_round_trip_gives_the_same_logits(checkpoint: tuple[Path, CausalLMModule]) -> None:
    path, module = checkpoint
    lm = NexusLM(checkpoint=path, tokenizer="byte", device="cpu")
    assert lm.max_length == 64
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.equal(lm.model(x), module.eval().model(x))


def _mc_task_for(path: Path, root: Path) -> None:
    model = NexusLM(checkpoint=path, tokenizer="byte", device="cpu").model
    write_task(root, "nexus_mc", mc_docs(model, block_size=64)[0], MC_BODY)


def _results(output_path: Path) -> dict:
    (found,) = output_path.rglob("results_*.json")
    return json.loads(found.read_text())["results"]


def test_cli_main_registers_the_model_and_reads_model_args(
    checkpoint: tuple[Path, CausalLMModule], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = checkpoint
    _mc_task_for(path, tmp_path)

    class LocalTaskManager(lm_eval.tasks.TaskManager):
        # The CLI always indexes lm_eval's built-in tasks too (10-30 s): the slow test below does that.
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTaskManager)
    # batch_size in --model_args and the CLI's own default batch_size must not collide.
    lm_eval_adapter.main(
        [
            "--model",
            MODEL_NAME,
            "--model_args",
            f"checkpoint={path},tokenizer=byte,device=cpu,batch_size=8",
            "--tasks",
            "nexus_mc",
            "--include_path",
            str(tmp_path),
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert _results(tmp_path / "out")["nexus_mc"]["acc,none"] == 0.5


@pytest.mark.slow
def test_python_m_command_end_to_end(checkpoint: tuple[Path, CausalLMModule], tmp_path: Path) -> None:
    """The documented user command, in a fresh interpreter (so registration happens through ``-m``)."""
    path, _ = checkpoint
    _mc_task_for(path, tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_nexus_recipes.evidence.lm_eval_adapter",
            "--model",
            "lightning_nexus",
            "--model_args",
            f"checkpoint={path},tokenizer=byte,device=cpu,batch_size=8",
            "--tasks",
            "nexus_mc",
            "--include_path",
            str(tmp_path),
            "--output_path",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results(tmp_path / "out")["nexus_mc"]["acc,none"] == 0.5


# ------------------------------------------------------------------ optional dependency
def test_missing_lm_eval_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lm_eval...` fail
    spec = importlib.util.spec_from_file_location("_adapter_without_lm_eval", lm_eval_adapter.__file__)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_model_args_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        NexusLM(tokenizer="byte", device="cpu")
    with pytest.raises(ValueError, match="integer"):
        NexusLM(model=tiny_gpt(), device="cpu", batch_size="auto")
    with pytest.warns(UserWarning, match="tokenizer vocab"):
        NexusLM(model=GPT(GPTConfig(size="tiny", vocab_size=512)), tokenizer="byte", device="cpu")
    module = CausalLMModule(model=GPTConfig(size="tiny", block_size=32))
    with pytest.raises(ValueError, match="configure_model"):
        NexusLM(model=module, device="cpu")
    module.configure_model()
    assert NexusLM(model=module, device="cpu").model is module.model  # a LightningModule is unwrapped
