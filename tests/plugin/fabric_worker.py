"""Run by test_fabric.py as a script on 2 CPU processes (Fabric's DDP launcher re-executes it for rank 1).

Every case runs in the same two processes, one after another, on fresh models: rank r trains on batches
r, r+2, ... (K=3, two windows) and writes OUT/{case}_rank{r}.pt with its final parameters, or with the
error message for the misuse cases, which must be refused.

Cases: NexusFabric in sync="every" and "window"; NexusFabric with the usual Fabric accumulation idiom
(``no_backward_sync`` inside the window) and with the forward alone under ``no_sync`` (both refused); a
plain PyTorch loop (DistributedDataParallel + torch.amp.GradScaler + the core) in exact mode, in window
mode, and with ``no_sync`` in an exact window (refused).

With the argument "16-mixed": NexusFabric with a CPU GradScaler, rank 1 alone overflowing in window 2 of
4, in both sync modes (OUT/overflow_{sync}_rank{r}.pt).
"""

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision
from torch.nn.parallel import DistributedDataParallel

from lightning_nexus import Nexus
from lightning_nexus.fabric import NexusFabric
from lightning_nexus.replicas import average_pseudo_gradients, broadcast_ddp_buffers
from tests.plugin.test_fabric import INNER_LR, K, N, amp_forward, loss_fn, make_net, make_opt, worker_batches


def nexus_fabric_loop(fabric, batches, sync, idiom="nexus"):
    net = make_net()
    model, opt = fabric.setup(net, make_opt(net))
    nexus = NexusFabric(fabric, model, opt, inner_lr=INNER_LR, sync=sync)
    for start in range(0, len(batches), K):
        for k, x in enumerate(batches[start : start + K]):
            if idiom == "no_backward_sync":  # the usual Fabric accumulation idiom, wrong for Nexus
                with fabric.no_backward_sync(model, enabled=k < K - 1):
                    nexus.backward(loss_fn(model(x)))
            elif idiom == "forward_in_no_sync":  # the sync is lost in the forward; backward runs outside
                with fabric.no_backward_sync(model, enabled=k < K - 1):
                    out = model(x)
                nexus.backward(loss_fn(out))
            else:
                nexus.backward(loss_fn(model(x)))
        nexus.step()
    return list(net.parameters())


def overflow_loop(fabric, batches, sync, rank):
    """16-mixed with a CPU GradScaler; rank 1 alone gets an inf input in window 2 (its local batch 4)."""
    net = make_net()
    model, opt = fabric.setup(net, make_opt(net))
    nexus = NexusFabric(fabric, model, opt, inner_lr=INNER_LR, sync=sync)
    scaler = fabric.strategy.precision.scaler
    taken, scales, params = [], [], []
    for start in range(0, len(batches), K):
        for i, x in enumerate(batches[start : start + K], start):
            if rank == 1 and i == K + 1:
                x = torch.full_like(x, float("inf"))
            nexus.backward(loss_fn(model(x)))
        taken.append(nexus.step())
        scales.append(scaler.get_scale())
        params.append([p.detach().clone() for p in net.parameters()])
    return {"params": params[-1], "taken": taken, "scales": scales, "window_params": params}


def plain_loop(batches, mode):
    """DDP + GradScaler + the core, no Fabric in the loop (Fabric only started the process group)."""
    net = make_net()
    ddp = DistributedDataParallel(net)
    opt = make_opt(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    if mode == "window":
        ddp.require_backward_grad_sync = False
    exact = mode in ("every", "no_sync")
    # window mode in fp32 (the scaler still scales): compared exactly with the fp32 window reference
    forward = amp_forward if exact else (lambda module, x: module(x))
    nexus = Nexus(
        ddp.parameters(),
        inner_lr=INNER_LR,
        grad_scaler=scaler,
        replica_group=torch.distributed.group.WORLD if exact else None,
    )
    for start in range(0, len(batches), K):
        for k, x in enumerate(batches[start : start + K]):
            if mode == "no_sync" and k < K - 1:
                with ddp.no_sync():
                    scaler.scale(loss_fn(forward(ddp, x))).backward()
            else:
                scaler.scale(loss_fn(forward(ddp, x))).backward()
            nexus.inner_step()
        result = nexus.finish_window()
        skipped = result.skipped
        if mode == "window":
            broadcast_ddp_buffers(ddp)
            skipped = average_pseudo_gradients(nexus.params, skipped)
        if not skipped:
            scaler.step(opt)  # unscales G·scale back to G
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return list(net.parameters())


def main(out: Path, precision: str) -> None:
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", plugins=[plugin])
    else:
        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    rank = fabric.global_rank
    if precision == "16-mixed":
        for sync in ("window", "every"):
            result = overflow_loop(fabric, worker_batches(4 * N // 2)[rank::2], sync, rank)  # 4 windows
            torch.save(result, out / f"overflow_{sync}_rank{rank}.pt")
            scaler.update(2.0**6)  # the next case starts from the same scale
            torch.distributed.barrier()
        return
    batches = worker_batches(N)[rank::2]
    cases = {
        "fabric_every": lambda: nexus_fabric_loop(fabric, batches, "every"),
        "fabric_window": lambda: nexus_fabric_loop(fabric, batches, "window"),
        "fabric_no_backward_sync": lambda: nexus_fabric_loop(fabric, batches, "every", "no_backward_sync"),
        "fabric_forward_in_no_sync": lambda: nexus_fabric_loop(fabric, batches, "every", "forward_in_no_sync"),
        "plain_every": lambda: plain_loop(batches, "every"),
        "plain_window": lambda: plain_loop(batches, "window"),
        "plain_no_sync": lambda: plain_loop(batches, "no_sync"),
    }
    for name, case in cases.items():
        try:
            result = {"params": [p.detach().clone() for p in case()]}
        except RuntimeError as err:
            result = {"error": str(err)}
        torch.save(result, out / f"{name}_rank{rank}.pt")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "32-true")
