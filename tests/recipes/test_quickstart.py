"""The README's main command, end to end on CPU (shortened): trains, prints the loss table and writes
the TensorBoard tags users learn (docs/monitoring.md)."""

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lightning_nexus",
        "fit",
        "--config",
        "recipes/quickstart.yaml",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "24",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--data.init_args.corpus_bytes_per_source",
        "100000",
        "--data.init_args.val_batches_per_source",
        "2",
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "val loss after step 6" in out and "OOD mean" in out, out[-2000:]
    log_dirs = list((tmp_path / "runs" / "quickstart").glob("version_*"))
    assert len(log_dirs) == 1 and f"TensorBoard logs: {log_dirs[0]}" in out

    events = EventAccumulator(str(log_dirs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    train_sources = ["code", "prose", "math", "formal"]
    ood_sources = [s for s in ("grammar_ood", "c_headers") if f"val/loss/{s}" in tags]
    assert ood_sources, sorted(tags)
    expected = {"train/loss", "train/lr", "perf/tokens_per_sec", "val/loss", "val/loss/ood"}
    expected |= {f"train/loss/{s}" for s in train_sources} | {f"val/loss/{s}" for s in train_sources}
    expected |= {"nexus/pseudo_grad_norm", "nexus/inner_displacement", "nexus/skipped_windows"}
    assert expected <= tags, sorted(expected - tags)
    assert any(t.startswith("nexus/grad_cosine/") for t in tags), sorted(tags)
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(loss) == 3 and all(0 < v < 6 for v in loss)  # steps 2, 4, 6; byte-level loss starts near ln(256)=5.5
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr == sorted(lr) and lr[0] < lr[-1]  # linear warmup (30 steps): rises every outer step
