"""Throughput, MFU and peak memory of Nexus against plain AdamW accumulation, side by side in one process.

    python -m benchmarks.throughput --model gpt:gpt2_124m --batch-size 16 --block 1024 --accumulate 4 \\
        --precision bf16-mixed --compile --loop both --json benchmarks/throughput.jsonl

Arms. For each loop, two arms on the same model preset, the same initial weights (every fit seeds and
builds its own model), the same synthetic token batches and the same compile state:

* ``adamw``: plain gradient accumulation over K micro-batches, then the recipes' AdamW (fused on CUDA,
  weight decay on matrices, warmup-cosine schedule), gradients clipped at ``--clip``.
* ``nexus``: the same with Nexus inner steps inside the window (γ = ``--inner-lr``).

Loops (``--loop``):

* ``lightning`` (default): the recipe path, ``lightning_nexus_recipes.CausalLMModule`` + ``Trainer(accumulate_grad_batches=K)``,
  ``NexusCallback`` for the Nexus arm, and a logger that makes Lightning do its logging work every
  ``--log-every`` steps without writing files (the recipes log every 10).
* ``plain``: a plain PyTorch loop over the same model, optimizer and schedule (made by CausalLMModule's own
  ``configure_model`` and ``configure_optimizers``), Nexus through the core ``lightning_nexus.Nexus``. Same
  mean cross-entropy, but none of the recipe's per-source loss logging (which costs a host sync per
  micro-batch, ``torch.unique(source_id).tolist()``), so lightning/plain shows what Lightning *and* the
  recipe's bookkeeping cost.
* ``both``: all four arms, alternating.

Timing. Every fit runs ``--warmup-steps`` outer steps untimed (compilation, allocator growth, creation of
the optimizer state), then ``--steps`` timed outer steps. The stopwatch starts and stops at optimizer-step
boundaries, with ``torch.cuda.synchronize()`` there on CUDA and nowhere inside a step, so it times whole
windows including their queued kernels. Fits alternate between arms in balanced order (``benchmarks/ab.py``)
for ``--repeats`` rounds after ``--warmup-fits`` discarded rounds; figures are medians over rounds, and
ratios also carry the range of the per-round ratios. Data are random tokens made once on the device, so
no data loading is timed.

Memory. Peak = ``torch.cuda.max_memory_allocated`` over a whole fit (warm-up included: compilation and the
first optimizer step allocate there). Every fit builds a fresh model from the same seed; before the next
fit starts, the previous one's trainer, module, optimizer and Nexus buffers are dropped, garbage-collected
and the caching allocator emptied, and then the peak counter is reset. We chose this over keeping one live
copy per arm because the other arm's weights, gradients, AdamW state and Nexus buffer would then sit in
every peak, and its allocator fragments would blur the difference being measured. The memory still
allocated when a fit starts (the shared token pool, plus anything a previous fit leaked) is reported as
``start_mem_bytes``: equal values across arms mean the peaks are comparable. Expected Nexus cost: one fp32
copy of the parameters (the anchor), i.e. ``peak_mem_diff_over_fp32_params`` ≈ 1.

MFU = flops_per_token(T) · tokens/s / peak FLOP/s: the model config's ``flops_per_token`` (6 per matmul
parameter + attention 12·L·d·T, PaLM convention) and Lightning's ``get_available_flops`` for the device and
precision (bf16 for bf16-mixed; fp32 for 32-true, TF32 when ``--float32-matmul-precision`` allows it).
Lightning's table lists some chips at their sparse peak (H200: 2.0 PFLOP/s bf16, twice the dense figure);
pass ``--peak-flops`` for those. On CPU, peak memory is None, and so is MFU unless ``--peak-flops`` is given.

Models: ``FAMILY:SIZE`` from lightning_nexus_recipes.models (``gpt:tiny``, ``gpt:gpt2_124m``, ``gpt:gpt2_350m``,
``llama:tiny``, ``llama:130m``, ``llama:370m``, ``llama:1b``, ``llama:3b``) at the preset's vocabulary (GPT-2's
50304, Llama's 32000). The recipe YAMLs train the embedded corpus with a byte tokenizer, whose vocabulary
of 256 is ``--vocab-size 256`` here (a smaller embedding and head: fewer FLOPs and a cheaper Nexus step).

Output: a table on stdout, progress on stderr, and with ``--json PATH`` one JSON line per invocation
appended to PATH (fields listed in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.ab import Measurement, NullLogger, Stopwatch, alternate, ratio, spread
from lightning_nexus import DEFAULT_INNER_LR, Nexus, NexusCallback
from lightning_nexus_recipes.models import GPTConfig, LlamaConfig, ModelConfig
from lightning_nexus_recipes.models.gpt import GPT_PRESETS
from lightning_nexus_recipes.models.llama import LLAMA_PRESETS
from lightning_nexus_recipes.module import CausalLMModule

PRECISIONS = ("32-true", "bf16-mixed")
LOOPS = {"lightning": ("lightning",), "plain": ("plain",), "both": ("lightning", "plain")}
OPTIMIZERS = ("adamw", "nexus")
_FAMILIES: dict[str, tuple[type[GPTConfig] | type[LlamaConfig], dict[str, Any]]] = {
    "gpt": (GPTConfig, GPT_PRESETS),
    "llama": (LlamaConfig, LLAMA_PRESETS),
}


@dataclass(frozen=True)
class ModelSpec:
    """A recipe model preset, optionally with another vocabulary."""

    family: str
    size: str
    vocab_size: int | None = None

    @property
    def name(self) -> str:
        return f"{self.family}:{self.size}"

    def config(self) -> ModelConfig:
        """A fresh config: CausalLMModule may edit the one it is given."""
        cls, _ = _FAMILIES[self.family]
        return cls(size=self.size, vocab_size=self.vocab_size)


def parse_model(text: str, vocab_size: int | None = None) -> ModelSpec:
    """``"gpt:gpt2_124m"`` → ModelSpec; the error lists every valid name."""
    family, _, size = text.partition(":")
    valid = [f"{f}:{s}" for f, (_, presets) in _FAMILIES.items() for s in presets]
    if family not in _FAMILIES or size not in _FAMILIES[family][1]:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected FAMILY:SIZE, one of {', '.join(valid)}")
    return ModelSpec(family, size, vocab_size)


class _TokenPool(Dataset):
    """``length`` micro-batches cycling through a few fixed synthetic ones that already live on the device."""

    def __init__(self, pool: Sequence[dict[str, Tensor]], length: int) -> None:
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.pool[index % len(self.pool)]


def make_token_pool(
    vocab_size: int, batch_size: int, block: int, accumulate: int, device: torch.device, seed: int
) -> list[dict[str, Tensor]]:
    """Two windows of distinct random micro-batches in the recipes' batch format, micro-batch k of a window
    tagged with source k (one source per micro-batch, as the recipes' round-robin schedule does). More
    distinct batches would only add memory to every peak: random tokens cost the same to train on."""
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab_size, (2 * accumulate, batch_size, block + 1), generator=generator)
    return [
        {
            "input_ids": t[:, :-1].contiguous().to(device),
            "labels": t[:, 1:].contiguous().to(device),
            "source_id": torch.full((batch_size,), i % accumulate, device=device),
        }
        for i, t in enumerate(tokens)
    ]


@dataclass
class Setup:
    """What every fit shares, resolved once from the command line."""

    args: argparse.Namespace
    spec: ModelSpec
    device: torch.device
    pool: list[dict[str, Tensor]]

    @property
    def total_steps(self) -> int:
        return self.args.warmup_steps + self.args.steps

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.block * self.args.accumulate

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def new_module(self) -> CausalLMModule:
        args = self.args
        return CausalLMModule(model=self.spec.config(), lr=args.lr, max_steps=self.total_steps, compile=args.compile)


class _WindowTimer(pl.Callback):
    """Times outer steps warmup_steps+1 … total_steps of a Lightning fit.

    ``on_train_batch_end`` of a window's last micro-batch runs right after its optimizer step (global_step
    has just advanced), so starting at global_step == warmup_steps and stopping at global_step ==
    total_steps brackets exactly the timed windows.
    """

    def __init__(self, warmup_steps: int, total_steps: int, sync: Callable[[], None]) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.watch = Stopwatch(sync)
        self.result: tuple[float, float] | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.warmup_steps and not self.watch.running and self.result is None:
            self.watch.start()
        elif step == self.total_steps and self.watch.running:
            self.result = self.watch.stop()


def fit_lightning(setup: Setup, nexus: bool) -> Measurement:
    """One fit through the recipe path: CausalLMModule + Trainer(accumulate_grad_batches=K)."""
    args = setup.args
    torch.manual_seed(args.seed)  # the Trainer builds the model (configure_model) on the device with this seed
    module = setup.new_module()
    timer = _WindowTimer(args.warmup_steps, setup.total_steps, setup.sync)
    callbacks: list[pl.Callback] = [timer]
    if nexus:
        callbacks.append(NexusCallback(inner_lr=args.inner_lr, exact=args.exact))
    trainer = pl.Trainer(
        accelerator=setup.device.type,
        devices=1,
        precision=args.precision,
        max_steps=setup.total_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip or None,
        callbacks=callbacks,
        logger=NullLogger(),
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(_TokenPool(setup.pool, setup.total_steps * args.accumulate), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    if timer.result is None:
        raise RuntimeError(f"the Lightning fit stopped at step {trainer.global_step} of {setup.total_steps}")
    wall, cpu = timer.result
    loss = trainer.callback_metrics.get("train/loss")
    last_loss = None if loss is None else float(loss)
    return Measurement(wall, cpu, work=args.steps * setup.tokens_per_step, extra={"last_loss": last_loss})


def fit_plain(setup: Setup, nexus: bool) -> Measurement:
    """One fit through a plain PyTorch loop over the recipe's own model, optimizer and LR schedule."""
    args, device, K = setup.args, setup.device, setup.args.accumulate
    torch.manual_seed(args.seed)
    module = setup.new_module()
    with torch.device(device):  # as Lightning's configure_model context does: same init as the other loop
        module.configure_model()
    module.train()
    model = module.model
    assert model is not None
    configured = module.configure_optimizers()  # fused AdamW on CUDA, the same groups and schedule
    optimizer: torch.optim.Optimizer = configured["optimizer"]
    scheduler = configured["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    inner = Nexus(optimizer.param_groups, inner_lr=args.inner_lr, exact=args.exact) if nexus else None
    bf16 = args.precision == "bf16-mixed"
    batches = itertools.cycle(setup.pool)

    def window() -> Tensor:
        for _ in range(K):
            batch = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                logits = model(batch["input_ids"])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
            # Lightning's 1/K on every micro-batch, so both loops hand the optimizer the same gradient
            (loss / K).backward()
            if inner is not None:
                inner.inner_step(loss_scale=1.0 / K)
        step = inner is None or not inner.finish_window().skipped
        if step:
            if args.clip:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup_steps):
        window()
    watch = Stopwatch(setup.sync)
    watch.start()
    for _ in range(args.steps):
        loss = window()
    wall, cpu = watch.stop()
    return Measurement(wall, cpu, work=args.steps * setup.tokens_per_step, extra={"last_loss": float(loss)})


def _release(device: torch.device) -> None:
    """Free what earlier fits left (Trainer ↔ module reference cycles need the collector)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured(fit: Callable[[Setup, bool], Measurement], setup: Setup, nexus: bool) -> Callable[[], Measurement]:
    """An arm for :func:`benchmarks.ab.alternate`: one fit on a clean device, with its memory figures."""

    def run() -> Measurement:
        _release(setup.device)
        start = peak = None
        if setup.cuda:
            torch.cuda.reset_peak_memory_stats(setup.device)
            start = torch.cuda.memory_allocated(setup.device)
        result = fit(setup, nexus)
        if setup.cuda:
            peak = torch.cuda.max_memory_allocated(setup.device)
        return dataclasses.replace(result, extra={**result.extra, "start_mem_bytes": start, "peak_mem_bytes": peak})

    return run


# --------------------------------------------------------------------------- reporting
def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    flops = get_available_flops(device, torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
    return None if flops is None else float(flops)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def summarize(
    setup: Setup, runs: dict[str, list[Measurement]], flops: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-arm figures and per-loop Nexus/AdamW ratios (plus Lightning/plain ratios when both loops ran)."""
    config = setup.spec.config()
    flops_per_token = config.flops_per_token(setup.args.block)
    arms: dict[str, Any] = {}
    for name, results in runs.items():
        rates = spread([m.wall_rate for m in results])
        peaks = [m.extra["peak_mem_bytes"] for m in results]
        starts = [m.extra["start_mem_bytes"] for m in results]
        arms[name] = {
            "tokens_per_s": rates.median,
            "tokens_per_s_range": [rates.low, rates.high],
            "step_s": setup.tokens_per_step / rates.median,
            "mfu": flops_per_token * rates.median / flops if flops else None,
            "peak_mem_bytes": max(peaks) if setup.cuda else None,
            "start_mem_bytes": max(starts) if setup.cuda else None,
            "cpu_tokens_per_s": spread([m.cpu_rate for m in results]).median,
            "last_loss": results[-1].extra["last_loss"],
            "rounds_tokens_per_s": [m.wall_rate for m in results],
            "rounds_cpu_tokens_per_s": [m.cpu_rate for m in results],
        }
    fp32_copy = 4 * config.num_params()
    ratios: dict[str, Any] = {}
    loops = LOOPS[setup.args.loop]
    for loop in loops:
        adamw, nexus = f"{loop}/adamw", f"{loop}/nexus"
        r = ratio(arms[nexus]["rounds_tokens_per_s"], arms[adamw]["rounds_tokens_per_s"])
        # per CPU second of this process: on a shared CPU machine far steadier than wall time (on a GPU it
        # counts host launch and wait time, and means little)
        r_cpu = ratio(arms[nexus]["rounds_cpu_tokens_per_s"], arms[adamw]["rounds_cpu_tokens_per_s"])
        diff = None if not setup.cuda else arms[nexus]["peak_mem_bytes"] - arms[adamw]["peak_mem_bytes"]
        ratios[loop] = {
            "throughput_nexus_over_adamw": r.value,
            "throughput_nexus_over_adamw_range": [r.paired.low, r.paired.high],
            "throughput_nexus_over_adamw_cpu_time": r_cpu.value,
            "throughput_nexus_over_adamw_cpu_time_range": [r_cpu.paired.low, r_cpu.paired.high],
            "peak_mem_diff_bytes": diff,
            "peak_mem_diff_over_fp32_params": None if diff is None else diff / fp32_copy,
        }
    if len(loops) == 2:
        ratios["lightning_over_plain"] = {}
        for opt in OPTIMIZERS:
            r = ratio(arms[f"lightning/{opt}"]["rounds_tokens_per_s"], arms[f"plain/{opt}"]["rounds_tokens_per_s"])
            ratios["lightning_over_plain"][opt] = r.value
            ratios["lightning_over_plain"][f"{opt}_range"] = [r.paired.low, r.paired.high]
    return arms, ratios


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def format_table(record: dict[str, Any]) -> str:
    args, model = record["args"], record["model"]
    lines = [
        f"{model['spec']} ({model['params'] / 1e6:.2f}M params, vocab {model['vocab_size']}), micro-batch "
        f"{args['batch_size']}x{args['block']}, K={args['accumulate']} ({record['tokens_per_step']:,} tokens/step), "
        f"{args['precision']}, {'compiled' if args['compile'] else 'eager'}, {record['device_name']}",
        f"{args['repeats']} round(s) of {args['steps']} timed step(s) after {args['warmup_steps']} warm-up step(s); "
        f"medians (range over rounds)",
        "",
        f"{'loop':<10} {'arm':<6} {'tokens/s':>12} {'(range)':>21} {'step ms':>9} {'MFU':>7} {'peak GiB':>9}",
    ]
    for name, arm in record["arms"].items():
        loop, opt = name.split("/")
        low, high = arm["tokens_per_s_range"]
        mfu = "n/a" if arm["mfu"] is None else f"{arm['mfu']:.1%}"
        lines.append(
            f"{loop:<10} {opt:<6} {arm['tokens_per_s']:>12,.0f} {f'({low:,.0f}-{high:,.0f})':>21} "
            f"{arm['step_s'] * 1e3:>9.1f} {mfu:>7} {_gib(arm['peak_mem_bytes']):>9}"
        )
    lines.append("")
    for loop in LOOPS[args["loop"]]:
        r = record["ratios"][loop]
        low, high = r["throughput_nexus_over_adamw_range"]
        memory = "peak memory n/a (CPU)"
        if r["peak_mem_diff_bytes"] is not None:
            memory = (
                f"peak memory {r['peak_mem_diff_bytes'] / 2**30:+.2f} GiB = "
                f"{r['peak_mem_diff_over_fp32_params']:.2f} fp32 parameter copies"
            )
        cpu_time = ""
        if record["device"] == "cpu":
            c_low, c_high = r["throughput_nexus_over_adamw_cpu_time_range"]
            cpu_time = (
                f"; per CPU second {r['throughput_nexus_over_adamw_cpu_time']:.4f} (per round {c_low:.4f}-{c_high:.4f})"
            )
        lines.append(
            f"{loop:<10} nexus/adamw: throughput {r['throughput_nexus_over_adamw']:.4f} "
            f"(per round {low:.4f}-{high:.4f}){cpu_time}, {memory}"
        )
    if "lightning_over_plain" in record["ratios"]:
        r = record["ratios"]["lightning_over_plain"]
        lines.append(f"lightning/plain throughput: adamw {r['adamw']:.4f}, nexus {r['nexus']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="gpt:tiny", help="recipe preset FAMILY:SIZE (default gpt:tiny)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="override the preset's vocabulary (256 = the recipes' byte tokenizer)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="B, sequences per micro-batch")
    parser.add_argument("--block", type=int, default=128, help="T, tokens per sequence")
    parser.add_argument(
        "--accumulate", type=int, default=4, help="K, micro-batches per optimizer step (accumulate_grad_batches)"
    )
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each transformer block (CausalLMModule(compile=True))"
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available, else cpu"
    )
    parser.add_argument("--loop", default="lightning", choices=list(LOOPS), help="training loop(s) to measure")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per fit")
    parser.add_argument(
        "--warmup-steps", type=int, default=3, help="untimed optimizer steps at the start of every fit (>= 1)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one fit per arm each)")
    parser.add_argument("--warmup-fits", type=int, default=0, help="discarded rounds before the timed ones")
    parser.add_argument("--inner-lr", type=float, default=DEFAULT_INNER_LR, help="Nexus γ")
    parser.add_argument(
        "--exact", action="store_true", help="Nexus exact mode (Σ d_k in a second fp32 buffer; docs/gpu.md)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm as in the recipes (0: off)")
    parser.add_argument("--log-every", type=int, default=10, help="Trainer(log_every_n_steps) in the lightning loop")
    parser.add_argument(
        "--float32-matmul-precision",
        default="highest",
        choices=["highest", "high", "medium"],
        help="torch.set_float32_matmul_precision (matters for 32-true on CUDA; the recipes leave 'highest')",
    )
    parser.add_argument(
        "--peak-flops", type=float, default=None, help="peak FLOP/s for MFU, overriding Lightning's table"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line with every figure to this file")
    return parser


def _check(args: argparse.Namespace, spec: ModelSpec, parser: argparse.ArgumentParser) -> torch.device:
    for name in ("batch_size", "block", "accumulate", "steps", "warmup_steps", "repeats", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_fits < 0:
        parser.error("--warmup-fits must be >= 0")
    context = spec.config().block_size
    if args.block > context:
        parser.error(f"--block {args.block} exceeds the context length {context} of {spec.name}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


@contextmanager
def _benchmark_settings(float32_matmul_precision: str) -> Iterator[None]:
    """Process-wide settings for the run, restored afterwards (``main`` may be called in-process, e.g. by tests).

    Lightning's per-Trainer banners, its data-loader advice (PossibleUserWarning) and a deprecation notice
    it triggers inside torch on every fit would drown the table; its other warnings stay.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    matmul = torch.get_float32_matmul_precision()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PossibleUserWarning)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        torch.set_float32_matmul_precision(float32_matmul_precision)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(matmul)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON record it prints and appends."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        spec = parse_model(args.model, args.vocab_size)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    device = _check(args, spec, parser)
    with _benchmark_settings(args.float32_matmul_precision):
        record = _run(args, argv, spec, device)
    print(format_table(record), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _run(args: argparse.Namespace, argv: Sequence[str], spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    config = spec.config()
    pool = make_token_pool(config.vocab_size, args.batch_size, args.block, args.accumulate, device, args.seed)
    setup = Setup(args, spec, device, pool)
    fits = {"lightning": fit_lightning, "plain": fit_plain}
    arms = {
        f"{loop}/{opt}": measured(fits[loop], setup, opt == "nexus") for loop in LOOPS[args.loop] for opt in OPTIMIZERS
    }

    def progress(round_index: int, arm: str, m: Measurement) -> None:
        label = "warm-up" if round_index < 0 else f"round {round_index + 1}/{args.repeats}"
        peak = m.extra["peak_mem_bytes"]
        print(
            f"[throughput] {label} {arm}: {m.wall_rate:,.0f} tokens/s, {m.wall_s / args.steps * 1e3:.1f} ms/step"
            + ("" if peak is None else f", peak {peak / 2**30:.2f} GiB"),
            file=sys.stderr,
            flush=True,
        )

    runs = alternate(arms, args.repeats, warmup=args.warmup_fits, on_result=progress)
    flops = peak_flops(device, args.precision, args.peak_flops)
    arm_figures, ratios = summarize(setup, runs, flops)
    record: dict[str, Any] = {
        "benchmark": "throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.throughput", *argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "model": {
            "spec": spec.name,
            "params": config.num_params(),
            "vocab_size": config.vocab_size,
            "flops_per_token": config.flops_per_token(args.block),
        },
        "tokens_per_step": setup.tokens_per_step,
        "peak_flops": flops,
        "arms": arm_figures,
        "ratios": ratios,
    }
    return record


if __name__ == "__main__":
    main()
