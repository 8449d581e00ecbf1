"""The notebooks: each runs top to bottom at the small budget, and its committed outputs stay small.

Each notebook reads `BUDGET = os.environ.get("KL_RL_NOTEBOOK_BUDGET", "full")` in its first code
cell; CI runs them at "small". Regenerate the committed full-budget outputs with the command in
notebooks/README.md.
"""

import copy
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
# A name no user or system kernelspec has, so the kernel can only be the one written below.
KERNEL_NAME = "kl-rl-test-python"
MAX_NOTEBOOK_BYTES = 2_000_000
MAX_TEXT_CHARS = 2_000  # plain-text output: no printed arrays
MAX_HTML_CHARS = 20_000  # HTML output: small tables


def _ids(paths):
    return [path.name for path in paths]


def _text_outputs(output):
    """(limit, text) of each textual part of one cell output.

    Plain text is held to MAX_TEXT_CHARS. An output with an HTML form (a pandas table) is held to
    MAX_HTML_CHARS in both forms: its plain-text fallback is never what a reader sees.
    """
    if output.output_type == "stream":
        return [(MAX_TEXT_CHARS, output.text)]
    data = output.get("data", {})
    limit = MAX_HTML_CHARS if "text/html" in data else MAX_TEXT_CHARS
    return [(limit, "".join(data[mime])) for mime in ("text/plain", "text/html") if mime in data]


def _figure_cells(nb):
    """Indices of the code cells that display an image."""
    return {
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        and any(key.startswith("image/") for output in cell.outputs for key in output.get("data", {}))
    }


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter, and the environment every notebook kernel inherits."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kl_rl tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    # JUPYTER_PATH comes first in jupyter's data path, ahead of user and system kernelspecs.
    monkeypatch.setenv(
        "JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH")]))
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KL_RL_NOTEBOOK_BUDGET", "small")
    monkeypatch.setenv("KL_RL_CACHE_DIR", "off")
    # XLA_FLAGS (tests/conftest.py's fast-compile setting) reaches the kernel with the rest.


# Executing a notebook compiles every program it runs, a minute or two each at the small budget.
# The default run executes the estimator notebook (02); 01, 03, 04, 05 and 06, whose code paths the
# unit tests also cover (05's: tests/test_lm.py; 06's: tests/test_experiments.py), run with
# `pytest -m slow`, which CI runs too.
# That keeps the default run within its 10-minute budget.
SLOW_TO_RUN = {
    "01_compare_algorithms.ipynb",
    "03_kl_regularization.ipynb",
    "04_kl_anchors.ipynb",
    "05_rlhf_in_miniature.ipynb",
    "06_kl_policy_iteration.ipynb",
}
RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_TO_RUN else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", RUNS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_at_small_budget(path, kernel_env):
    committed = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(committed)
    # Appended last so cell numbers in error messages match the notebook: checks that the kernel is
    # this interpreter and that the notebook honoured the small budget.
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import os, sys\n"
            f"assert sys.executable == {sys.executable!r}, sys.executable\n"
            "assert os.environ['KL_RL_NOTEBOOK_BUDGET'] == 'small'\n"
            "assert BUDGET == 'small', BUDGET"
        )
    )
    client = NotebookClient(
        nb, timeout=600, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    client.execute()  # a failing cell raises CellExecutionError naming the cell and its traceback

    missing = sorted(_figure_cells(nb) - _figure_cells(committed))
    assert not missing, f"{path.name}: code cells {missing} draw a figure but carry none in the committed file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_notebook_has_small_outputs(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size:,} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    assert code_cells, f"{path.name} has no code"
    first = code_cells[0].source
    assert "KL_RL_NOTEBOOK_BUDGET" in first, f"{path.name}: the first code cell does not read the budget"

    counts = [cell.execution_count for cell in code_cells]
    assert None not in counts and counts == sorted(counts), f"{path.name}: not run top to bottom, counts {counts}"
    assert _figure_cells(nb), f"{path.name}: committed without figures"
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{path.name}: cell {index} committed with an error"
            for limit, text in _text_outputs(output):
                assert len(text) <= limit, f"{path.name}: cell {index} has a {len(text):,}-char output: {text[:200]}"
