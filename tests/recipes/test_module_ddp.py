"""CausalLMModule's validation loss is the token-weighted mean over all ranks' tokens, also when the ranks
hold unequal amounts of data (2 gloo processes, against a hand computation)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_nexus_recipes import CausalLMModule, GPTConfig

# rank -> batches of (rows, unmasked tokens per row): unequal numbers of batches, rows and tokens
SHAPES = {0: [(2, 16), (3, 9), (1, 4)], 1: [(1, 16)]}


def _batch(rank: int, i: int, rows: int, keep: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + i)
    ids = torch.randint(0, 256, (rows, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, keep:] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def _module() -> CausalLMModule:
    torch.manual_seed(0)
    module = CausalLMModule(model=GPTConfig(size="tiny"), vocab_size=256)
    module.configure_model()
    return module.eval()


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module = _module()
    module._start_eval([object()])  # one validation loader
    with torch.no_grad():
        for i, (rows, keep) in enumerate(SHAPES[rank]):
            module.validation_step(_batch(rank, i, rows, keep), i)
    torch.save(module._eval_loss[0].compute(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_validation_loss_is_token_weighted_over_unequal_ranks(tmp_path):
    port = 29600 + os.getpid() % 300
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    module = _module()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rank, shapes in SHAPES.items():
            for i, (rows, keep) in enumerate(shapes):
                batch = _batch(rank, i, rows, keep)
                logits = module(batch["input_ids"]).float()
                mask = batch["labels"] != -100
                total += F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum").item()
                tokens += int(mask.sum())
    assert torch.equal(got[0], got[1])  # the ranks agree
    torch.testing.assert_close(got[0].double(), torch.tensor(total / tokens, dtype=torch.float64), rtol=1e-5, atol=0)


def test_weighted_mean_metric_with_nan_checks_disabled_still_drops_weights():
    """Why CausalLMModule keeps its training sums itself: in torchmetrics 1.9, MeanMetric's
    nan_strategy="disable" (the only mode without a host read per update) ignores the weights. If this
    starts failing, torchmetrics fixed it and the training sums can become MeanMetrics too."""
    from torchmetrics import MeanMetric

    metric = MeanMetric(nan_strategy="disable")
    metric.update(torch.tensor(2.0), weight=torch.tensor(3.0))
    metric.update(torch.tensor(1.0), weight=torch.tensor(0.0))
    assert metric.compute().item() == 1.5  # unweighted; the weighted mean is 2.0
