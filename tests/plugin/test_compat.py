"""Every private upstream access in ``lightning_nexus._compat`` exercised for the behaviour we rely on.

A failure here after an upgrade names the upstream attribute that changed: fix ``_compat`` (or pin).
"""

import inspect
import json

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import FSDPStrategy

from lightning_nexus import _compat


def test_logger_will_write_follows_log_every_n_steps(tmp_path):
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append((trainer.global_step, _compat.logger_will_write(trainer)))

    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=6, log_every_n_steps=3, callbacks=[Record()], enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel())
    # Lightning writes when (batches_that_stepped + 1) % log_every_n_steps == 0
    assert [w for _, w in seen] == [(s + 1) % 3 == 0 for s, _ in seen]


def test_batches_that_stepped_counts_optimizer_steps_under_accumulation(tmp_path):
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append((_compat.batches_that_stepped(trainer), trainer.global_step))

    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[Record()],
        enable_progress_bar=False, enable_checkpointing=False, logger=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel())
    # one step per 2 batches; Lightning advances its counter after on_train_batch_end, global_step before
    assert seen == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]


def _scaled_step(fused: bool, mark: bool) -> tuple[torch.Tensor, float, torch.optim.Optimizer]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * 0.5).sum()).backward()  # .grad = 0.5 * scale
    if not _compat.optimizer_unscales_in_step(opt):
        scaler.unscale_(opt)
    if mark:
        _compat.mark_overflow(scaler, opt)
    before = p.detach().clone()
    scaler.step(opt)
    scaler.update()
    return p.detach() - before, scaler.get_scale(), opt


def test_fused_optimizer_unscales_inside_step():
    """The flag's meaning: a fused AdamW handed the *scaled* gradient steps exactly like an unfused one
    handed the unscaled gradient. If this breaks, NexusCallback would step 1/scale too small or large."""
    assert _compat.optimizer_unscales_in_step(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True))
    assert not _compat.optimizer_unscales_in_step(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
    fused, _, _ = _scaled_step(fused=True, mark=False)
    plain, _, _ = _scaled_step(fused=False, mark=False)
    torch.testing.assert_close(fused, plain)
    assert fused.abs().min() > 0.05  # a real AdamW step of ~lr, not ~lr/scale


def test_mark_overflow_skips_the_step_and_backs_off():
    """After unscale_ recorded finite gradients (the unfused path; a fused optimizer's step re-checks .grad
    itself, so NexusCallback puts a NaN there instead)."""
    delta, scale, _ = _scaled_step(fused=False, mark=True)
    assert torch.count_nonzero(delta) == 0
    assert scale == 512.0


def test_ddp_sync_buffers_broadcasts_rank0_buffers():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    try:
        net = torch.nn.BatchNorm1d(3)
        ddp = DistributedDataParallel(net)
        net.running_mean.fill_(2.0)
        _compat.ddp_sync_buffers(ddp)  # one rank: the broadcast keeps rank 0's values and must not raise
        assert torch.equal(net.running_mean, torch.full((3,), 2.0))
    finally:
        dist.destroy_process_group()


def test_fsdp1_managed_params_is_empty_for_a_plain_module():
    assert _compat.fsdp1_managed_params(torch.nn.Linear(2, 2)) == []


def test_fsdp1_managed_params_lists_flat_param_and_views():
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29532", rank=0, world_size=1)
    try:
        fsdp = FullyShardedDataParallel(torch.nn.Linear(3, 2), device_id=torch.device("cpu"), use_orig_params=True)
        managed = _compat.fsdp1_managed_params(fsdp)
        flat = managed[0]
        assert flat.numel() >= 3 * 2 + 2  # FSDP pads the flat parameter for alignment
        assert {id(p) for p in fsdp.parameters()} <= {id(p) for p in managed}
    finally:
        dist.destroy_process_group()


def test_fsdp_setup_model_hook_is_still_called_by_setup():
    """NexusFSDPStrategy overrides this private hook to wrap on CPU with ``device_id=cpu``."""
    assert list(inspect.signature(FSDPStrategy._setup_model).parameters) == ["self", "model"]
    assert "_setup_model" in inspect.getsource(FSDPStrategy.setup)


def test_litdata_item_dtype_matches_what_litdata_writes(tmp_path):
    import litdata
    from litdata.streaming.item_loader import TokensLoader

    litdata.optimize(
        fn=_tokens, inputs=[0, 1], output_dir=str(tmp_path), chunk_size=64, item_loader=TokensLoader(), num_workers=1
    )
    config = json.loads((tmp_path / "index.json").read_text())["config"]
    kind, idx = config["data_format"][0].split(":")
    assert np.dtype(_compat.litdata_item_dtype(kind, int(idx))) == np.dtype(np.uint16)


def _tokens(i: int):
    yield np.arange(10, dtype=np.uint16) + i


def test_attached_trainer(tmp_path):
    model = BoringModel()
    assert _compat.attached_trainer(model) is None
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    assert _compat.attached_trainer(model) is trainer


def test_trainer_callbacks_is_the_list_lightning_calls_hooks_from(tmp_path):
    calls = []

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            calls.append("train_start")

    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    _compat.trainer_callbacks(trainer).append(Record())
    trainer.fit(BoringModel())
    assert calls == ["train_start"]


def test_trainer_log_every_n_steps_is_the_resolved_setting(tmp_path):
    assert _compat.trainer_log_every_n_steps(Trainer(default_root_dir=tmp_path, log_every_n_steps=7)) == 7
    assert _compat.trainer_log_every_n_steps(Trainer(default_root_dir=tmp_path)) == 50
    assert _compat.trainer_log_every_n_steps(Trainer(default_root_dir=tmp_path, barebones=True)) == 0


def test_upstream_changed_names_the_attribute():
    class Bare:
        pass

    with pytest.raises(_compat.UpstreamChanged, match="_logger_connector.should_update_logs"):
        _compat.logger_will_write(Bare())  # type: ignore[arg-type]


def test_fabric_forward_module_is_the_ddp_wrapper_or_the_plain_module():
    import torch.distributed as dist
    from lightning.fabric import Fabric
    from lightning.fabric.wrappers import _FabricModule
    from torch.nn.parallel import DistributedDataParallel

    fabric = Fabric(accelerator="cpu", devices=1)
    net = torch.nn.Linear(2, 2)
    assert _compat.fabric_forward_module(fabric.setup_module(net)) is net
    # under DDP, Fabric forwards through the DistributedDataParallel it wrapped the module in (whose gradient
    # sync NexusFabric switches): built here as Fabric's DDP strategy does, on a one-process gloo group
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(net)
        assert _compat.fabric_forward_module(_FabricModule(ddp, fabric.strategy, original_module=net)) is ddp
    finally:
        dist.destroy_process_group()


def test_trainer_datamodule_is_the_one_given_to_fit(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringDataModule

    seen = []

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(_compat.trainer_datamodule(trainer))

    data = BoringDataModule()
    trainer = Trainer(
        default_root_dir=tmp_path, max_steps=1, callbacks=[Record()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel(), datamodule=data)
    assert seen == [data]
