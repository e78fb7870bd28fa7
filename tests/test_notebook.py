"""notebooks/tour.ipynb runs top to bottom and its computed lessons hold; it is committed clean.

The notebook is executed in a real kernel (nbclient), started with this interpreter, with the
repository root as working directory and the per-test cache and data directories of conftest.py
in its environment. Its last cell prints a JSON summary of the numbers it computed.
"""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"
KERNEL = "pruning-explorer-tests"


@pytest.fixture
def headless_kernel(tmp_path, monkeypatch):
    """A kernelspec that runs ipykernel with the interpreter running the tests (not whatever `python` is on PATH).

    PRUNING_EXPLORER_HEADLESS tells the notebook there is no front end, so it skips its sliders:
    widgets with nobody to answer them can stall a headless run (jupyter/nbclient#312).
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PRUNING_EXPLORER_HEADLESS", "1")
    return KERNEL


def _summary(executed: nbformat.NotebookNode) -> dict:
    last = [cell for cell in executed.cells if cell.cell_type == "code"][-1]
    text = "".join(output.get("text", "") for output in last.outputs if output.output_type == "stream")
    return json.loads(text)


def test_tour_runs_and_its_lessons_hold(tmp_path, headless_kernel):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name=headless_kernel, timeout=300, allow_errors=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    nbformat.write(notebook, tmp_path / "tour.executed.ipynb")  # kept for a look after a failure
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert errors == []
    summary = _summary(notebook)

    unstructured, channel = summary["unstructured"], summary["channel"]
    assert unstructured["speedup_flops"] > 5  # 90 % of the weights are zeros
    assert unstructured["speedup_measured"] < unstructured["speedup_flops"] / 3  # zeros are not skipped
    assert unstructured["compression_ratio"] > 2  # but they compress
    assert channel["speedup_flops"] > 2
    assert channel["speedup_measured"] > 1  # removed channels do make it faster
    # and keep a far larger share of what the FLOPs promise
    assert (channel["speedup_measured"] / channel["speedup_flops"]
            > 2 * unstructured["speedup_measured"] / unstructured["speedup_flops"])

    group = summary["group"]
    assert group["layers"] > 3 and group["real"] > 5 * group["naive"]
    assert group["removed_one"] == round(group["real"])  # the real count is what one removal takes away

    criteria = summary["criteria"]
    assert criteria["magnitude"]["local"] > criteria["random"]["local"] + 0.2
    assert 0 < summary["mlp_accuracy"] <= 1

    collapse = summary["collapse"]
    assert collapse["global"]["collapse_point"] < collapse["sparsity"] < collapse["local"]["collapse_point"]
    assert collapse["global"]["collapsed"] and not collapse["local"]["collapsed"]
    assert not collapse["global, min_keep 10%"]["collapsed"]

    methods = summary["methods"]
    assert "one_shot" in methods
    ran = {name: result for name, result in methods.items() if result["sparsity"] is not None}
    assert "one_shot" in ran
    for name, result in ran.items():
        assert result["sparsity"] == pytest.approx(0.9, abs=0.05), name
        assert 0 <= result["accuracy"] <= 1, name


def test_committed_notebook_is_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the tour has no code cells"
    assert [cell.outputs for cell in code if cell.outputs] == []
    assert [cell.execution_count for cell in code if cell.execution_count is not None] == []
    assert "widgets" not in notebook.metadata  # no saved widget state either
