"""The Colab notebooks run top to bottom (nbclient) on tiny settings injected into the cell tagged
`parameters`; each must finish without an error in any cell."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_pipeline import GRPO_SMOKE, smoke_config

COLAB = Path(__file__).resolve().parents[1] / "colab"


def run_notebook(name: str, tmp_path: Path, parameters: str) -> nbformat.NotebookNode:
    book = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# injected by tests/test_notebooks.py\n" + parameters
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return book


def outputs(book: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart(tmp_path):
    text = outputs(run_notebook("01_quickstart", tmp_path, "SFT_STEPS = 4"))
    assert "detailed thinking on" in text and "detailed thinking off" in text
    assert "49,867,145,216" in text  # LN-Super's parameter count from the preset


def test_convert_and_eval(tmp_path):
    text = outputs(run_notebook("02_convert_and_eval", tmp_path, 'HUB_CONFIG = ""\nEVAL_EXAMPLES = 8'))
    assert "8 devices" in text and "| tiny-decilm | on |" in text and "perplexity" in text


@pytest.mark.slow
def test_pipeline_notebook(tmp_path):
    config = smoke_config(tmp_path)
    text = outputs(run_notebook("03_pipeline", tmp_path, f'CONFIG = "{config}"'))
    assert "Puzzle child:" in text


@pytest.mark.slow
def test_grpo_notebook(tmp_path):
    overrides = [*GRPO_SMOKE, "start.sft_steps=4", "start.sft_batch_size=8", "start.sft_seq_len=128"]
    text = outputs(run_notebook("04_grpo", tmp_path, f"OVERRIDES = {overrides!r}"))
    assert "accuracy: first quarter" in text and "--- thinking on" in text
