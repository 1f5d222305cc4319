"""The README's Python examples run as written, and its manual-optimization module trains correctly."""

import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from tests.helpers import assert_params_close, reference_nexus_training

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_callback_and_manual_examples():
    blocks = python_blocks()
    assert any("NexusCallback(" in b for b in blocks)
    assert any("automatic_optimization = False" in b for b in blocks)


def test_callback_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes lightning_logs/ into the working directory
    block = next(b for b in python_blocks() if "NexusCallback(" in b)
    exec(compile(block, "README.md", "exec"), {})


def test_manual_optimization_example_matches_reference(tmp_path):
    block = next(b for b in python_blocks() if "automatic_optimization = False" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    manual_cls = namespace["MyModule"]

    class Automatic(pl.LightningModule):  # the same model and loss, written for the reference loop
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(32, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    manual = manual_cls(K=4)
    reference = Automatic()
    reference.load_state_dict(manual.state_dict())
    batches = [torch.randn(3, 32, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(manual, train_dataloaders=DataLoader(batches, batch_size=None))
    want = reference_nexus_training(reference, batches, K=4, inner_lr=0.05, normalize=True)
    assert_params_close([p.detach() for p in manual.parameters()], want)


def test_readme_model_table_is_the_code_output():
    from lightning_nexus_recipes.models import size_table

    assert size_table() in README.read_text()
