"""The one train/eval switch the probes, diagnostics and lm-eval adapter share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own ``training`` flag is restored afterwards (a model
    may be partly in eval mode on purpose, so ``model.train()`` would be wrong)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
