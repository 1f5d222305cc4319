"""``CausalLMModule``: next-token pretraining of the recipe models, with the dashboard of docs/monitoring.md.

Logged tags: ``train/loss``, ``train/loss/<source>``, ``train/lr``, ``val/loss/<source>`` (one per val
dataloader), ``val/loss`` (mean over in-distribution sources), ``val/loss/ood`` (mean over held-out
sources), ``perf/tokens_per_sec`` and ``perf/mfu`` (GPUs with a known peak only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_nexus._compat import attached_trainer
from lightning_nexus_recipes.fsdp import shard_model
from lightning_nexus_recipes.models import GPTConfig, ModelConfig, RecipeModel, build_model

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for 2-D hidden weights and AdamW for everything else, as one optimizer.

    Lightning's automatic optimization (and so NexusCallback) drives exactly one optimizer, and LR
    schedulers need a real ``torch.optim.Optimizer``. The two inner optimizers share this object's
    ``param_groups`` dicts and ``state``, so ``zero_grad``, ``state_dict``/``load_state_dict`` and
    schedulers act on all groups at once. Muon groups use ``adjust_lr_fn="match_rms_adamw"``
    (Moonlight), so one learning rate and one schedule fit both kinds of group.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
        >>> opt = MuonWithAdamW(muon_params=[net[1].weight], adamw_params=[net[0].weight, net[1].bias], lr=1e-3)
        >>> [g["kind"] for g in opt.param_groups]
        ['muon', 'adamw', 'adamw']
    """

    def __init__(
        self,
        muon_params: Iterable[Tensor],
        adamw_params: Iterable[Tensor],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        momentum: float = 0.95,
        fused: bool | None = None,
    ) -> None:
        muon_params = list(muon_params)
        adamw_params = list(adamw_params)
        if not muon_params:
            raise ValueError("MuonWithAdamW: no 2-D hidden weights for Muon; use plain AdamW instead")
        decay = [p for p in adamw_params if p.ndim >= 2]
        no_decay = [p for p in adamw_params if p.ndim < 2]
        self._muon = torch.optim.Muon(
            [{"params": muon_params, "kind": "muon"}],
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        adamw_groups: list[dict[str, Any]] = [
            {"params": decay, "kind": "adamw"},
            {"params": no_decay, "kind": "adamw", "weight_decay": 0.0},
        ]
        self._adamw = torch.optim.AdamW(
            [g for g in adamw_groups if g["params"]], lr=lr, weight_decay=weight_decay, betas=betas, fused=fused
        )
        # Same dict objects: the inner optimizers see every change made through this one.
        super().__init__(self._muon.param_groups + self._adamw.param_groups, defaults={"lr": lr})
        self._relink()

    def _relink(self) -> None:
        self._muon.param_groups = [g for g in self.param_groups if g["kind"] == "muon"]
        self._adamw.param_groups = [g for g in self.param_groups if g["kind"] == "adamw"]
        self._muon.state = self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict replaces self.state and self.param_groups with new objects.
        super().load_state_dict(state_dict)
        self._relink()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_PRECISION_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}


class CausalLMModule(LightningModule):
    """Pretrains a GPT or Llama recipe model on source-tagged batches
    (``{"input_ids", "labels", "source_id"}``, as produced by ``MixedSourceDataModule``).

    The model is built in ``configure_model`` so that FSDP2 (``ModelParallelStrategy``) can create it on
    the meta device and shard it block by block before any full-size weights exist.

    Example::

        >>> from lightning_nexus_recipes.models import GPTConfig
        >>> module = CausalLMModule(model=GPTConfig(size="tiny"), lr=1e-3)
        >>> module.configure_model()
        >>> module.model.config.n_layer
        4

    Args:
        model: architecture (``GPTConfig`` or ``LlamaConfig``; ``size`` picks a preset), or a zoo model:
            ``LitGPTConfig`` (litgpt) or ``HFCausalLMConfig`` (transformers).
        vocab_size: overrides ``model.vocab_size``; ``None`` takes the datamodule's ``vocab_size``
            when there is one, else the preset's.
        optimizer: ``adamw`` (all parameters) or ``muon`` (Muon for 2-D hidden weights, AdamW for
            embeddings, output head, norms and biases).
        lr: peak learning rate, reached after ``warmup_steps`` optimizer steps.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        warmup_steps: linear warmup length in optimizer (outer) steps.
        max_steps: length of the schedule in optimizer steps; ``None`` uses the trainer's
            ``estimated_stepping_batches``.
        weight_decay: decoupled weight decay on matrices (not on norms and biases).
        betas: AdamW betas.
        muon_momentum: Muon momentum.
        compile: ``torch.compile`` each transformer block (a training switch, so not in the model config).
        activation_checkpointing: recompute each block in the backward pass to save activation memory.
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        vocab_size: int | None = None,
        optimizer: Literal["adamw", "muon"] = "adamw",
        lr: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        muon_momentum: float = 0.95,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"CausalLMModule.optimizer={optimizer!r}; choose 'adamw' or 'muon'")
        if lr <= 0:
            raise ValueError(f"CausalLMModule.lr={lr} must be > 0")
        self.config = model if model is not None else GPTConfig(size="tiny")
        if vocab_size is not None:
            self.config.vocab_size = vocab_size
        self.optimizer_name = optimizer
        self.lr, self.min_lr_ratio, self.warmup_steps, self.max_steps = lr, min_lr_ratio, warmup_steps, max_steps
        beta1, beta2 = betas  # a list from Python callers becomes the tuple the optimizers and hparams keep
        self.weight_decay, self.betas, self.muon_momentum = weight_decay, (beta1, beta2), muon_momentum
        # not self.compile: that would shadow nn.Module.compile
        self.compile_blocks, self.activation_checkpointing = compile, activation_checkpointing
        self.save_hyperparameters()
        self.model: RecipeModel | None = None
        # Per source, [loss sum, token count] of the current window, on the device and rank-local (as train/loss).
        # Not a torchmetrics MeanMetric: its update reads a NaN flag on the host (a GPU stall every micro-batch),
        # and nan_strategy="disable", which skips that, drops the weights (torchmetrics 1.9).
        self._train_sums: Tensor | None = None
        self._win_step = -1
        # Token-weighted means per validation/test dataloader, exact across ranks holding unequal token counts.
        # Created once the number of loaders is known, on the device, and kept out of the module tree.
        self._eval_loss: list[MeanMetric] = []  # per validation/test dataloader, synced over ranks
        self._tokens_since = 0
        self._t_since: float | None = None
        self._perf: dict[str, float] = {}
        self._peak_flops: float | None = None

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None:
            return
        if self.hparams["vocab_size"] is None and getattr(dm, "vocab_size", None) is not None:
            # The data decides the vocabulary (256 for bytes); record it so checkpoints reload alone.
            self.config.vocab_size = int(dm.vocab_size)
            self.hparams["vocab_size"] = self.config.vocab_size
        max_ids = getattr(dm, "max_token_ids", None) or {}
        if max_ids and max(max_ids.values()) >= self.config.vocab_size:
            source, largest = max(max_ids.items(), key=lambda item: item[1])
            raise ValueError(
                f"model vocabulary {self.config.vocab_size} is too small for the data: source '{source}' holds token "
                f"id {largest}. Set model.init_args.vocab_size (or the model config's vocab_size) to at least "
                f"{largest + 1}, or leave it unset so the data decides"
            )
        data_block = getattr(dm, "block_size", None)
        if data_block is not None and data_block > self.config.block_size:
            raise ValueError(
                f"data.block_size={data_block} exceeds the model context length model.model.block_size="
                f"{self.config.block_size} ({type(self.config).__name__} size {self.config.size!r}): "
                f"lower data.init_args.block_size or raise model.init_args.model.init_args.block_size"
            )

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this again for validate/test after fit
            return
        mesh = self.device_mesh if isinstance(self._strategy(), ModelParallelStrategy) else None
        if mesh is None:
            self.model = self._build()
            return
        if self.optimizer_name == "muon":
            raise ValueError(
                "CausalLMModule.optimizer='muon' is not supported with ModelParallelStrategy (FSDP2): Muon "
                "orthogonalizes whole matrices but FSDP2 shards them; use optimizer: adamw"
            )
        # FSDP2: build on meta, shard per block, then allocate only this rank's shards and initialize.
        with torch.device("meta"):
            model = self._build()
        param_dtype = _PRECISION_DTYPES.get(str(self.trainer.precision))
        shard_model(model, mesh["data_parallel"], param_dtype=param_dtype)
        model.to_empty(device=self.trainer.strategy.root_device)
        model.reset_parameters()
        self.model = model

    def _strategy(self) -> Any:
        trainer = attached_trainer(self)
        return trainer.strategy if trainer is not None else None

    def _build(self) -> RecipeModel:
        model = build_model(self.config)
        model.activation_checkpointing = self.activation_checkpointing
        if self.compile_blocks:
            # Per block: compiles once (blocks are identical) and composes with FSDP2 and checkpointing.
            for block in model.blocks:
                block.compile()
        return model

    def forward(self, input_ids: Tensor) -> Tensor:
        assert self.model is not None, "call configure_model() first (the Trainer does)"
        return self.model(input_ids)

    def _token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-sample loss sums and token counts; labels of -100 are ignored."""
        logits = self(batch["input_ids"])
        labels = batch["labels"]
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100
        ).view_as(labels)
        counts = (labels != -100).sum(dim=1)
        return losses.sum(dim=1), counts

    # --------------------------------------------------------------- training
    def _source_names(self, attr: str) -> list[str] | None:
        names = getattr(getattr(self.trainer, "datamodule", None), attr, None)
        if names is None and attr == "source_names":  # e.g. lightning_nexus.data.per_source_dataloader
            names = getattr(self.trainer.train_dataloader, "source_names", None)
        return list(names) if names is not None else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._count_tokens(batch)
        sample_loss, sample_tokens = self._token_losses(batch)
        loss = sample_loss.sum() / sample_tokens.sum().clamp(min=1)

        # Lightning only forwards on_step values of a window's last micro-batch to the logger, so keep
        # window means per source and log them at the boundary: each source seen in the window (one per
        # micro-batch with per-source mixing) carries its window mean.
        source_id = batch.get("source_id")
        names = self._source_names("source_names")
        if source_id is None or not names:
            names = ["all"] if source_id is None else [f"source{i}" for i in range(int(source_id.max()) + 1)]
            source_id = torch.zeros_like(sample_tokens) if source_id is None else source_id
        if self.trainer.global_step != self._win_step or self._train_sums is None:
            self._win_step = self.trainer.global_step
            self._train_sums = torch.zeros(2, len(names), device=sample_loss.device)
        elif self._train_sums.shape[1] < len(names):  # unnamed sources: a higher id than seen so far
            self._train_sums = F.pad(self._train_sums, (0, len(names) - self._train_sums.shape[1]))
        # Which sources a micro-batch holds stays on the device: reading it on the host per micro-batch
        # (torch.unique(...).tolist()) would stall the GPU every micro-batch.
        self._train_sums[0].index_add_(0, source_id, sample_loss.detach().float())
        self._train_sums[1].index_add_(0, source_id, sample_tokens.float())
        totals = self._train_sums.sum(1)
        self.log("train/loss", totals[0] / totals[1].clamp(min=1), prog_bar=True)
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        window_ends = progress % self.trainer.accumulate_grad_batches == 0 or self.trainer.is_last_batch
        if batch.get("source_id") is not None and window_ends:  # one host read per window
            means = self._train_sums[0] / self._train_sums[1].clamp(min=1)
            for sid in (self._train_sums[1] > 0).nonzero().flatten().tolist():
                self.log(f"train/loss/{names[sid]}", means[sid])
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]))
        for key, value in self._perf.items():
            self.log(key, value, prog_bar=key == "perf/tokens_per_sec")
        return loss

    def _count_tokens(self, batch: dict[str, Tensor]) -> None:
        """Throughput over the wall time between windows; validation time is excluded (timer reset)."""
        now = time.perf_counter()
        if self.trainer.global_step != self._win_step and self._t_since is not None and self._tokens_since:
            dt = now - self._t_since
            tokens_per_sec = self._tokens_since * self.trainer.world_size / dt
            self._perf = {"perf/tokens_per_sec": tokens_per_sec}
            if self._peak_flops:
                flops = self.config.flops_per_token(batch["input_ids"].shape[1]) * tokens_per_sec
                self._perf["perf/mfu"] = flops / (self._peak_flops * self.trainer.world_size)
            self._tokens_since, self._t_since = 0, now
        if self._t_since is None:
            self._t_since = now
        self._tokens_since += batch["input_ids"].numel()

    def on_fit_start(self) -> None:
        dtype = _PRECISION_DTYPES.get(str(self.trainer.precision), torch.float32)
        if self.device.type == "cuda":
            from lightning.fabric.utilities.throughput import get_available_flops

            self._peak_flops = get_available_flops(self.device, dtype)

    def on_validation_start(self) -> None:
        self._t_since, self._tokens_since = None, 0

    # ------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        self._start_eval(self.trainer.val_dataloaders)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        sample_loss, sample_tokens = self._token_losses(batch)
        tokens = sample_tokens.sum()
        self._eval_loss[dataloader_idx].update(sample_loss.sum().detach() / tokens.clamp(min=1), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval(self.trainer.test_dataloaders)

    def _start_eval(self, loaders: Any) -> None:
        # every rank creates one metric per loader, so every rank takes part in each metric's sync
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        # nan_strategy=nan keeps a NaN loss a NaN (the default would drop it with a warning)
        self._eval_loss = [MeanMetric(nan_strategy=float("nan")).to(self.device) for _ in range(count)]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        """Token-weighted loss per dataloader over all ranks' tokens (exact under DDP/FSDP, unequal shards too)."""
        if not self._eval_loss:
            return
        names = self._source_names("val_source_names") or [f"{i}" for i in range(len(self._eval_loss))]
        ood = set(self._source_names("ood_source_names") or [])
        per_source: dict[str, Tensor] = {}
        for idx, metric in enumerate(self._eval_loss):
            per_source[names[idx]] = metric.compute()
            metric.reset()
            self.log(f"{prefix}/loss/{names[idx]}", per_source[names[idx]], sync_dist=False)
        in_dist = [v for k, v in per_source.items() if k not in ood]
        held_out = [v for k, v in per_source.items() if k in ood]
        if in_dist:
            self.log(f"{prefix}/loss", torch.stack(in_dist).mean(), prog_bar=prefix == "val")
        if held_out:
            self.log(f"{prefix}/loss/ood", torch.stack(held_out).mean())

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        is_dtensor = any(isinstance(p, DTensor) for p in params)  # never true for the () fallback
        # Fused AdamW is one kernel for all parameters; we use it on CUDA, where it is fastest and tested
        # with FSDP2 DTensors, and keep the default (foreach) elsewhere.
        fused = True if all(p.device.type == "cuda" for p in params) else None
        if self.optimizer_name == "muon":
            if is_dtensor:
                raise ValueError("CausalLMModule.optimizer='muon' does not support sharded (DTensor) parameters")
            muon, other = _split_muon_params(self.model)
            optimizer: torch.optim.Optimizer = MuonWithAdamW(
                muon,
                other,
                lr=self.lr,
                weight_decay=self.weight_decay,
                betas=self.betas,
                momentum=self.muon_momentum,
                fused=fused,
            )
        else:
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas, fused=fused)
        total = self.max_steps or int(self.trainer.estimated_stepping_batches)
        if not 0 < total < 10**12:
            raise ValueError(
                "CausalLMModule cannot size the LR schedule: set trainer.max_steps (or model.init_args.max_steps)"
            )
        warmup, min_ratio = self.warmup_steps, self.min_lr_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio)
        )
        # interval=step: one scheduler step per optimizer (outer) step, i.e. per Nexus window.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _split_muon_params(model: RecipeModel) -> tuple[list[Tensor], list[Tensor]]:
    """Muon takes the 2-D weights inside the transformer blocks; embeddings and the output head are
    lookups/classifiers rather than hidden linear maps, so they stay with AdamW (as in the Muon paper)."""
    muon_ids = {id(p) for p in model.blocks.parameters() if p.ndim == 2 and p.requires_grad}
    muon: list[Tensor] = []
    other: list[Tensor] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if id(p) in muon_ids else other).append(p)
    return muon, other
