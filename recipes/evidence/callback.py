"""``EvidenceCallback``: downstream probes at every validation and common-minima diagnostics at the end.

Probes are logged as ``probe/<name>`` next to ``val/loss`` at the same step, so the experiment can
interpolate them at a matched loss like any validation metric. Diagnostics (Hutchinson Hessian trace
per source, per-source fine-tune distances) run once on the final model and go to TensorBoard as
``diag/...`` and, with the probes' final values, to ``<log_dir>/evidence.json`` for the experiment runner.
"""

from __future__ import annotations

import json
import os
from itertools import islice
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_nexus_recipes.evidence.diagnostics import fine_tune_distances, per_source_traces
from lightning_nexus_recipes.evidence.probes import ArithmeticTransferProbe, GrammarDepthProbe

EVIDENCE_FILE = "evidence.json"


class EvidenceCallback(Callback):
    """Probes and diagnostics for ``lightning_nexus_recipes.CausalLMModule`` on ``MixedSourceDataModule``.

    Args:
        probes: run the downstream probes at every validation.
        probe_items: items per probe (more = less noise, slower).
        diagnostics: run the end-of-training diagnostics.
        diagnostic_batches: validation micro-batches per train source used by the diagnostics.
        hessian_samples: Rademacher vectors per Hutchinson estimate (>= 2, for its standard error).
        finetune_steps: steps of the per-source fine-tunes.
        finetune_lr: learning rate of the per-source fine-tunes (plain SGD: the displacement then follows
            the loss landscape rather than Adam's per-coordinate scaling).

    Example::

        >>> from lightning_nexus_recipes.evidence.callback import EvidenceCallback
        >>> EvidenceCallback(diagnostics=False).probes[0].name
        'arith_transfer'
    """

    def __init__(
        self,
        probes: bool = True,
        probe_items: int = 200,
        diagnostics: bool = True,
        diagnostic_batches: int = 1,
        hessian_samples: int = 4,
        finetune_steps: int = 8,
        finetune_lr: float = 0.01,
    ) -> None:
        # checked here, not when the diagnostics run: a bad value must not cost a finished training run
        for name, value, low in (
            ("probe_items", probe_items, 1),
            ("diagnostic_batches", diagnostic_batches, 1),
            ("hessian_samples", hessian_samples, 2),
            ("finetune_steps", finetune_steps, 1),
        ):
            if value < low:
                raise ValueError(f"EvidenceCallback.{name} must be >= {low}, got {value}")
        if finetune_lr <= 0:
            raise ValueError(f"EvidenceCallback.finetune_lr must be > 0, got {finetune_lr}")
        self.probes = [ArithmeticTransferProbe(n_items=probe_items), GrammarDepthProbe()] if probes else []
        self.diagnostics = diagnostics
        self.diagnostic_batches, self.hessian_samples = diagnostic_batches, hessian_samples
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        self._last_probes: dict[str, float] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(trainer.datamodule, "text_tokenizer") or not hasattr(pl_module, "model"):
            raise ValueError(
                "EvidenceCallback needs recipes.CausalLMModule-style modules (a `.model` returning logits) and "
                "lightning_nexus.data.MixedSourceDataModule (its tokenizer and per-source validation data)"
            )

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.probes:
            return
        tokenizer = trainer.datamodule.text_tokenizer
        for probe in self.probes:
            # Deterministic and computed identically on every rank, so no reduction is needed.
            self._last_probes[probe.name] = accuracy = float(probe(pl_module.model, tokenizer))
            pl_module.log(f"probe/{probe.name}", accuracy)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        evidence: dict[str, Any] = {
            "probes": {p.name: {"accuracy": self._last_probes.get(p.name), "chance": p.chance} for p in self.probes},
        }
        if self.diagnostics:
            if any(type(p).__name__ == "DTensor" for p in pl_module.parameters()):
                rank_zero_warn("EvidenceCallback: diagnostics need unsharded parameters; skipped under FSDP")
            elif trainer.is_global_zero:
                evidence.update(self._diagnostics(trainer, pl_module))
        if trainer.is_global_zero and trainer.log_dir:
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, EVIDENCE_FILE), "w") as f:
                json.dump(evidence, f, indent=1)

    def _diagnostics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        dm = trainer.datamodule
        names = list(dm.val_source_names)
        loaders = dm.val_dataloader()
        batches = {
            name: [
                {k: v.to(pl_module.device) for k, v in b.items() if k in ("input_ids", "labels")}
                for b in islice(loaders[names.index(name)], self.diagnostic_batches)
            ]
            for name in dm.train_source_names
        }
        traces = per_source_traces(pl_module.model, batches, n_samples=self.hessian_samples, seed=0)
        tune = fine_tune_distances(pl_module.model, batches, steps=self.finetune_steps, lr=self.finetune_lr)
        summary = {
            "hessian_trace": {name: t.mean for name, t in traces.items()},
            "finetune": {
                "mean_to_start": tune.mean_to_start,
                "mean_pairwise": tune.mean_pairwise,
                # spread between the per-source solutions relative to how far each moved: smaller means the
                # sources pull the model the same way, i.e. their minima lie closer together around it
                "spread_ratio": tune.spread_ratio,
                "mean_loss_drop": sum(tune.loss_drop.values()) / len(tune.loss_drop),
            },
        }
        flat = {f"diag/hessian_trace/{k}": v for k, v in summary["hessian_trace"].items()}
        flat.update({f"diag/finetune/{k}": v for k, v in summary["finetune"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        return {
            "diagnostics": summary,
            "details": {"hessian_trace": {k: t.to_dict() for k, t in traces.items()}, "finetune": tune.to_dict()},
        }


__all__ = ["EVIDENCE_FILE", "EvidenceCallback"]
