"""``EvidenceCallback``: downstream probes at every validation and common-minima diagnostics at the end.

Probes are logged as ``probe/<name>`` next to ``val/loss`` at the same step, so the experiment can
interpolate them at a matched loss like any validation metric. With ``alignment_batches`` the like-for-like
gradient cosines (same weights, fixed validation batches) are logged at every validation as
``val/grad_cosine/{cross,within,cross_of_means}``. Diagnostics (Hutchinson Hessian trace per source,
per-source fine-tune distances, the gradient cosines at the final weights, and optionally the transfer
fine-tune on the held-out source and the gap to a known optimal loss) run once on the final model and go
to TensorBoard as ``diag/...`` and, with the probes' final values, to ``<log_dir>/evidence.json`` for the
experiment runner.

Data modules: ``lightning_nexus.data.MixedSourceDataModule`` (text probes) or any data module with the same
source-name properties and per-source validation loaders that brings its own probes (``evidence_probes()``),
transfer data (``transfer_batches(n)``) and optimum (``optimal_val_loss()``), such as
``lightning_nexus_recipes.evidence.synthetic.HMMDataModule``.
"""

from __future__ import annotations

import json
import os
from itertools import islice
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_nexus._compat import trainer_datamodule
from lightning_nexus_recipes.evidence.diagnostics import (
    fine_tune_curve,
    fine_tune_distances,
    gradient_alignment,
    per_source_traces,
)
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
        alignment_batches: validation batches per train source for the like-for-like gradient cosines at
            every validation and at the end (0: off; else >= 2, the within-source noise floor needs two).
        transfer_steps: steps of the transfer fine-tune (Adam) on the held-out source at the end (0: off;
            needs a data module with ``transfer_batches``).
        transfer_lr: its learning rate.
        transfer_batches: distinct training batches of the held-out source it cycles through.
        transfer_points: evaluations of the held-out validation loss along it (besides step 0).

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
        alignment_batches: int = 0,
        transfer_steps: int = 0,
        transfer_lr: float = 1e-3,
        transfer_batches: int = 8,
        transfer_points: int = 4,
    ) -> None:
        # checked here, not when the diagnostics run: a bad value must not cost a finished training run
        for name, value, low in (
            ("probe_items", probe_items, 1),
            ("diagnostic_batches", diagnostic_batches, 1),
            ("hessian_samples", hessian_samples, 2),
            ("finetune_steps", finetune_steps, 1),
            ("transfer_steps", transfer_steps, 0),
            ("transfer_batches", transfer_batches, 1),
            ("transfer_points", transfer_points, 1),
        ):
            if value < low:
                raise ValueError(f"EvidenceCallback.{name} must be >= {low}, got {value}")
        if alignment_batches < 0 or alignment_batches == 1:
            raise ValueError(f"EvidenceCallback.alignment_batches must be 0 (off) or >= 2, got {alignment_batches}")
        for name, rate in (("finetune_lr", finetune_lr), ("transfer_lr", transfer_lr)):
            if not rate > 0:
                raise ValueError(f"EvidenceCallback.{name} must be > 0, got {rate}")
        self.probes = [ArithmeticTransferProbe(n_items=probe_items), GrammarDepthProbe()] if probes else []
        self.diagnostics = diagnostics
        self.diagnostic_batches, self.hessian_samples = diagnostic_batches, hessian_samples
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        self.alignment_batches = alignment_batches
        self.transfer_steps, self.transfer_lr = transfer_steps, transfer_lr
        self.transfer_batches, self.transfer_points = transfer_batches, transfer_points
        self._last_probes: dict[str, float] = {}
        self._alignment_data: dict[str, list[dict[str, Any]]] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = _data(trainer)
        if not hasattr(pl_module, "model") or not all(
            hasattr(dm, a) for a in ("train_source_names", "val_source_names", "val_dataloader")
        ):
            raise ValueError(
                "EvidenceCallback needs recipes.CausalLMModule-style modules (a `.model` returning logits) and "
                "a data module with per-source validation data, such as lightning_nexus.data.MixedSourceDataModule"
            )
        if self.probes and hasattr(dm, "evidence_probes"):
            self.probes = list(dm.evidence_probes())  # the data module knows what its sources can test
        elif self.probes and not hasattr(dm, "text_tokenizer"):
            raise ValueError(
                f"EvidenceCallback: {type(dm).__name__} has neither `text_tokenizer` (for the text probes) nor "
                "`evidence_probes()`; pass probes=False"
            )
        if self.transfer_steps and not (hasattr(dm, "transfer_batches") and dm.ood_source_names):
            raise ValueError(
                f"EvidenceCallback.transfer_steps={self.transfer_steps} needs a data module with a held-out source "
                f"and `transfer_batches(n)` (such as HMMDataModule); {type(dm).__name__} has not: set transfer_steps: 0"
            )

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.probes:
            return
        tokenizer = getattr(_data(trainer), "text_tokenizer", None)
        for probe in self.probes:
            # Deterministic and computed identically on every rank, so no reduction is needed.
            self._last_probes[probe.name] = accuracy = float(probe(pl_module.model, tokenizer))
            pl_module.log(f"probe/{probe.name}", accuracy)
        if self.alignment_batches and not any(type(p).__name__ == "DTensor" for p in pl_module.parameters()):
            alignment = gradient_alignment(pl_module.model, self._alignment_batches(trainer, pl_module))
            for key in ("cross", "within", "cross_of_means"):
                pl_module.log(f"val/grad_cosine/{key}", getattr(alignment, key))

    def _alignment_batches(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, list[dict[str, Any]]]:
        # fixed once: every evaluation point (and every arm) sees the same batches
        if self._alignment_data is None:
            dm = _data(trainer)
            self._alignment_data = _val_batches(dm, dm.train_source_names, self.alignment_batches, pl_module.device)
        return self._alignment_data

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        evidence: dict[str, Any] = {
            "probes": {
                p.name: {
                    "accuracy": self._last_probes.get(p.name),
                    "chance": p.chance,
                    "ceiling": getattr(p, "ceiling", None),
                }
                for p in self.probes
            },
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
        dm = _data(trainer)
        batches = _val_batches(dm, dm.train_source_names, self.diagnostic_batches, pl_module.device)
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
        details: dict[str, Any] = {
            "hessian_trace": {k: t.to_dict() for k, t in traces.items()},
            "finetune": tune.to_dict(),
        }
        if self.alignment_batches:
            alignment = gradient_alignment(pl_module.model, self._alignment_batches(trainer, pl_module))
            summary["grad_alignment"] = {k: getattr(alignment, k) for k in ("cross", "within", "cross_of_means")}
            details["grad_alignment"] = alignment.to_dict()
        optimal = dm.optimal_val_loss() if hasattr(dm, "optimal_val_loss") else None
        if optimal is not None:
            # the final validation ran at the last step, so these are the final weights' losses
            gap = _optimality_gap(dm, trainer.callback_metrics)
            if gap:
                summary["optimality_gap"] = gap
            details["optimal_val_loss"] = optimal
        if self.transfer_steps:
            ood = dm.ood_source_names
            held = _val_batches(dm, ood, 10**9, pl_module.device)
            curve = fine_tune_curve(
                pl_module.model,
                dm.transfer_batches(self.transfer_batches),
                [b for name in ood for b in held[name]],
                steps=self.transfer_steps,
                lr=self.transfer_lr,
                points=self.transfer_points,
            )
            transfer = {f"loss@{step}": loss for step, loss in curve.items()}
            transfer["mean"] = sum(v for k, v in curve.items() if k > 0) / (len(curve) - 1)
            if optimal is not None:
                best = sum(optimal[n] for n in ood) / len(ood)
                transfer.update({f"excess@{step}": loss - best for step, loss in curve.items()})
            summary["transfer"] = transfer
            details["transfer"] = {
                "optimizer": "adam",
                "lr": self.transfer_lr,
                "steps": self.transfer_steps,
                "curve": curve,
            }
        flat = {f"diag/hessian_trace/{k}": v for k, v in summary["hessian_trace"].items()}
        for group in ("finetune", "grad_alignment", "optimality_gap", "transfer"):
            flat.update({f"diag/{group}/{k}": v for k, v in summary.get(group, {}).items()})
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        return {"diagnostics": summary, "details": details}


def _optimality_gap(dm: Any, metrics: Any) -> dict[str, float]:
    """``val/loss/<source>`` minus the data module's exact optimum, per train source, and their ``max``."""
    optimal = dm.optimal_val_loss()
    gap = {n: float(metrics[f"val/loss/{n}"]) - optimal[n] for n in dm.train_source_names if f"val/loss/{n}" in metrics}
    return {**gap, "max": max(gap.values())} if gap else {}


def _val_batches(dm: Any, names: list[str], n: int, device: Any) -> dict[str, list[dict[str, Any]]]:
    """The first ``n`` validation batches of each named source (``input_ids`` and ``labels``), on ``device``."""
    all_names = list(dm.val_source_names)
    loaders = dm.val_dataloader()
    return {
        name: [
            {k: v.to(device) for k, v in b.items() if k in ("input_ids", "labels")}
            for b in islice(loaders[all_names.index(name)], n)
        ]
        for name in names
    }


__all__ = ["EVIDENCE_FILE", "EvidenceCallback"]


def _data(trainer: Trainer) -> Any:
    """The run's data module, duck-typed: MixedSourceDataModule and HMMDataModule share the per-source
    names, validation loaders and (optionally) probes this callback reads; setup checks they exist."""
    return trainer_datamodule(trainer)
