"""The Python examples of the README and of every docs/ page run as written; the manual-optimization
module of docs/update_rule.md trains correctly; doc links point at files that exist."""

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import assert_params_close, reference_nexus_training

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


BLOCKS = [(page, i, block) for page in PAGES for i, block in enumerate(python_blocks(page))]


def test_readme_has_the_callback_example_and_update_rule_the_manual_one():
    assert any("NexusCallback(" in b for b in python_blocks(README))
    assert any("automatic_optimization = False" in b for b in python_blocks(ROOT / "docs/update_rule.md"))


@pytest.mark.parametrize(("page", "index", "block"), BLOCKS, ids=[f"{p.name}:{i}" for p, i, _ in BLOCKS])
def test_doc_python_block_runs(page, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write lightning_logs/ or data into the working directory
    exec(compile(block, f"{page.name} block {index}", "exec"), {"__name__": "__doc_example__"})


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_links_resolve(page):
    text = page.read_text()
    assert "DESIGN.md" not in text and "../shared" not in text  # the docs stand on their own
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_manual_optimization_example_matches_reference(tmp_path):
    page = ROOT / "docs/update_rule.md"
    block = next(b for b in python_blocks(page) if "automatic_optimization = False" in b)
    namespace: dict = {}
    exec(compile(block, page.name, "exec"), namespace)
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

    assert size_table() in (ROOT / "docs/recipes.md").read_text()
