"""Run by test_fsdp1.py, once per rank (the test starts both processes, so Lightning launches none and
several fits can share one process group): FSDP1 (NexusFSDPStrategy) on 2 CPU ranks with gloo.

Each scenario trains MLPModule (the single-process reference's module) for one epoch, rank r on batches
r, r+2, ..., and saves the gathered full parameters, the global step and the logged nexus metrics per window
to OUT/{scenario}_rank{r}.pt. Scenario "save" also writes OUT/mid.ckpt at local batch 4 (mid-window for
K=3), the window's gathered anchor to OUT/anchor.pt and its inner point θ_2 to OUT/inner.pt; "resume" starts
from OUT/mid.ckpt and also saves the parameters it started from.

Usage: fsdp1_worker.py OUT SCENARIO [SCENARIO ...]
"""

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback, NexusFSDPStrategy
from tests.helpers import MLPModule, boring_batches

K, N, CLIP = 3, 12, 0.3
NAMES = [name for name, _ in MLPModule().named_parameters()]


class FlatParamsMLP(MLPModule):
    """use_orig_params=False: the optimizer must hold FSDP's flat parameters (Lightning's requirement)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainer.model.parameters(), lr=0.1, momentum=0.9)


# name: (strategy kwargs, inner_lr, gradient_clip_val, module class)
SCENARIOS: dict[str, tuple[dict[str, Any], float, float | None, type]] = {
    "full_shard": ({}, 0.1, None, MLPModule),  # Lightning's default: FULL_SHARD, use_orig_params=True, root only
    "shard_grad_op_gamma0": (
        {"sharding_strategy": "SHARD_GRAD_OP", "auto_wrap_policy": {torch.nn.Linear}},
        0.0,
        None,
        MLPModule,
    ),
    "flat_params_clip": ({"use_orig_params": False}, 0.1, CLIP, FlatParamsMLP),
    "no_shard": ({"sharding_strategy": "NO_SHARD"}, 0.1, None, MLPModule),
    "save": ({}, 0.1, None, MLPModule),
    "resume": ({}, 0.1, None, MLPModule),
}


def full_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The unsharded parameters on every rank, in MLPModule's order (a collective: all ranks call it)."""
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return [state[name].detach().clone() for name in NAMES]


class _Record(pl.Callback):
    """Logged nexus metrics after each outer step (after NexusCallback's own batch-end logging)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.start: list[torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module):
        self.start = full_params(trainer.strategy.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx % K == K - 1:
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("nexus/")})


class _SaveMidWindow(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:  # the second window's anchor, before its first inner step
            anchor = full_params(trainer.strategy.model)
            if trainer.global_rank == 0:
                torch.save(anchor, self.out / "anchor.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 4:  # θ is two inner steps away from the anchor here
            inner = full_params(trainer.strategy.model)  # θ_2: where a resumed run must continue the window
            if trainer.global_rank == 0:
                torch.save(inner, self.out / "inner.pt")
            trainer.save_checkpoint(self.out / "mid.ckpt")


def run(out: Path, scenario: str) -> None:
    strategy_kwargs, inner_lr, clip, module_cls = SCENARIOS[scenario]
    record = _Record()
    callbacks = [NexusCallback(inner_lr=inner_lr), record] + ([_SaveMidWindow(out)] if scenario == "save" else [])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=NexusFSDPStrategy(**strategy_kwargs),
        max_epochs=1,
        accumulate_grad_batches=K,
        gradient_clip_val=clip,
        callbacks=callbacks,
        logger=CSVLogger(out / "logs", name=scenario),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    batches = boring_batches(n=N)[trainer.global_rank :: 2]
    ckpt = out / "mid.ckpt" if scenario == "resume" else None
    trainer.fit(module_cls(), train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt)
    result = {
        "params": full_params(trainer.strategy.model),
        "start": record.start,
        "metrics": record.metrics,
        "global_step": trainer.global_step,
    }
    torch.save(result, out / f"{scenario}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for name in sys.argv[2:]:
        run(Path(sys.argv[1]), name)
    # Lightning keeps the process group alive after fit; tearing it down before exit avoids an abort
    # ("terminate called without an active exception") from gloo threads at interpreter shutdown.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
