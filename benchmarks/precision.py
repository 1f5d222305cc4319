"""How exact is the pseudo-gradient G at real model shapes? One Nexus window on CPU against float64.

For each model shape and inner step γ, one window of K micro-batches (random tokens, tiny batch and
sequence: the precision of G depends on the parameters' magnitudes and the number of entries, not on the
data) runs through ``lightning_nexus.Nexus(exact=True)``. Along the way the same fp32 gradients g_k are
also accumulated in float64 as Σ g_k/‖g_k‖, the reference G of this very window. Per parameter kind
(embeddings, norms, matrices, biases) the table gives the relative L2 error ‖G − G_ref‖/‖G_ref‖ of

- ``read-off``: the default mode's G = (θ0 − θ_K)/(γn), read off the fp32 weights (computed here from the
  core's anchor and the weights with the core's own two operations, before ``finish_window``), and
- ``exact``: the exact mode's G = Σ d_k / n (the core's ``.grad`` after ``finish_window``),

and, as the scale that matters, the minibatch noise of G: ‖G_a − G_b‖/(√2‖G‖) between two windows with
different micro-batches at the same θ0 (γ = 0.05).

    python -m benchmarks.precision                 # gpt2_124m and llama 370m, K=4: a few minutes, ~10 GB
    python -m benchmarks.precision --tiny          # tiny shapes, seconds (the unit test runs this)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nexus import Nexus
from lightning_nexus_recipes.models import GPT, GPTConfig
from lightning_nexus_recipes.models.llama import Llama, LlamaConfig

KINDS = ("embeddings", "norms", "matrices", "biases")
RESULTS = Path(__file__).parent / "results" / "precision.jsonl"


def parameter_kinds(model: nn.Module) -> list[tuple[Tensor, str]]:
    """Each trainable parameter once (tied weights count as the embedding), with its kind."""
    kind: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            kind.setdefault(id(module.weight), "embeddings")
        elif isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                kind.setdefault(id(p), "norms")
    out, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((p, kind.get(id(p), "matrices" if p.dim() >= 2 else "biases")))
    return out


def read_off(anchor: Tensor, live: Tensor, inner_lr: float, num_micro_batches: int) -> Tensor:
    """The default mode's G for one tensor, as its finish_window computes it: θ0 − θ_K, then ·1/(γn), in fp32."""
    return (anchor - live.detach()).mul_(1.0 / (inner_lr * num_micro_batches))


class Window:
    """One Nexus window on ``model`` from its current weights θ0, with the float64 reference beside it."""

    def __init__(self, model: nn.Module, batches: list[Tensor], inner_lr: float) -> None:
        self.model, self.batches, self.inner_lr = model, batches, inner_lr
        self.params = parameter_kinds(model)

    def run(self) -> tuple[dict[str, dict[str, float]], list[Tensor]]:
        """Per kind the squared norms of the reference and of both errors; and the exact G (bf16, for noise)."""
        tensors = [p for p, _ in self.params]
        nexus = Nexus(tensors, inner_lr=self.inner_lr, exact=True)
        reference = [torch.zeros_like(p, dtype=torch.float64) for p in tensors]
        for x in self.batches:
            logits = self.model(x[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
            with torch.no_grad():  # float64 Σ g_k/‖g_k‖ of the same fp32 gradients, one tensor at a time
                norm = math.sqrt(sum(p.grad.double().square().sum().item() for p in tensors))
                for ref, p in zip(reference, tensors):
                    ref.add_(p.grad.double(), alpha=1.0 / norm)
            nexus.inner_step()
        n = len(self.batches)
        sums = {kind: {"ref": 0.0, "read_off": 0.0, "exact": 0.0} for kind in KINDS}
        with torch.no_grad():
            for (p, kind), anchor, ref in zip(self.params, nexus.anchor(), reference):
                ref.div_(n)
                g_read_off = read_off(anchor, p, self.inner_lr, n)
                sums[kind]["ref"] += ref.square().sum().item()
                sums[kind]["read_off"] += (g_read_off.double() - ref).square().sum().item()
            assert not nexus.finish_window().skipped
            exact_g = []
            for (p, kind), ref in zip(self.params, reference):
                sums[kind]["exact"] += (p.grad.double() - ref).square().sum().item()
                exact_g.append(p.grad.to(torch.bfloat16))
                p.grad = None
        return sums, exact_g


def _noise(model: nn.Module, g_a: list[Tensor], g_b: list[Tensor]) -> dict[str, float]:
    sq: dict[str, list[float]] = {kind: [0.0, 0.0] for kind in KINDS}
    for (_, kind), a, b in zip(parameter_kinds(model), g_a, g_b):
        sq[kind][0] += (a.double() - b.double()).square().sum().item()
        sq[kind][1] += (0.5 * (a.double().square().sum() + b.double().square().sum())).item()
    return {k: math.sqrt(d / (2 * g)) for k, (d, g) in sq.items() if g > 0}


def _batches(vocab: int, k: int, batch: int, seq: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq + 1), generator=gen) for _ in range(k)]


def measure(
    name: str, build: Callable[[], nn.Module], vocab: int, args: argparse.Namespace
) -> tuple[list[dict], dict[str, float]]:
    torch.manual_seed(0)
    model = build()
    if args.embedding_std is not None:  # e.g. litgpt-style N(0, 1) embeddings: |θ| up to ~4
        with torch.no_grad():
            for p, kind in parameter_kinds(model):
                if kind == "embeddings":
                    p.normal_(0.0, args.embedding_std)
    n_params = sum(p.numel() for p, _ in parameter_kinds(model))
    batches = _batches(vocab, args.accumulate, args.batch_size, args.seq_len, seed=1)
    rows, g_at = [], {}
    for gamma in args.inner_lrs:
        start = time.perf_counter()
        sums, exact_g = Window(model, batches, gamma).run()
        g_at[gamma] = exact_g
        for kind in KINDS:
            ref = sums[kind]["ref"]
            if ref == 0:
                continue
            rows.append(
                {
                    "model": name,
                    "params": n_params,
                    "inner_lr": gamma,
                    "kind": kind,
                    "read_off_rel_error": math.sqrt(sums[kind]["read_off"] / ref),
                    "exact_rel_error": math.sqrt(sums[kind]["exact"] / ref),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
    noise_gamma = 0.05 if 0.05 in g_at else args.inner_lrs[0]
    _, other_g = Window(
        model, _batches(vocab, args.accumulate, args.batch_size, args.seq_len, seed=2), noise_gamma
    ).run()
    noise = _noise(model, g_at[noise_gamma], other_g)
    for row in rows:
        row["minibatch_noise"] = noise.get(row["kind"], float("nan"))
    return rows, noise


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny GPT and Llama shapes (a rehearsal in seconds)")
    parser.add_argument("--inner-lrs", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches per window")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--embedding-std", type=float, default=None, help="re-draw embeddings as N(0, std)")
    parser.add_argument("--models", nargs="+", default=["gpt2_124m", "llama_370m"], choices=["gpt2_124m", "llama_370m"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines are appended here ('-': none)")
    args = parser.parse_args(argv)
    shapes = {
        "gpt2_124m": (lambda: GPT(GPTConfig(size="tiny" if args.tiny else "gpt2_124m")), 256 if args.tiny else 50304),
        "llama_370m": (lambda: Llama(LlamaConfig(size="tiny" if args.tiny else "370m")), 256 if args.tiny else 32000),
    }
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    all_rows = []
    for name in args.models:
        build, vocab = shapes[name]
        rows, _ = measure(("tiny " if args.tiny else "") + name, build, vocab, args)
        all_rows += rows
    print("| model | γ | kind | read-off (default) | exact mode | minibatch noise of G |")
    print("|---|---|---|---|---|---|")
    for r in all_rows:
        print(
            f"| {r['model']} | {r['inner_lr']} | {r['kind']} | {r['read_off_rel_error']:.2e} | "
            f"{r['exact_rel_error']:.2e} | {r['minibatch_noise']:.2f} |"
        )
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for r in all_rows:
                extra = {"K": args.accumulate, "tokens_per_micro_batch": args.batch_size * args.seq_len}
                extra["embedding_std"] = args.embedding_std
                f.write(
                    json.dumps({"benchmark": "precision", "date": stamp, **r, **extra, "torch": torch.__version__})
                    + "\n"
                )
    return all_rows


if __name__ == "__main__":
    main()
