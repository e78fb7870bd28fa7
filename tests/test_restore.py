"""Runs the store refused come back: `RunStore.restore`, `python -m explorer restore`, Compare's button.

The kept files are written by the store's own refusal path (`keep_runs`, or a save into a damaged store),
so the tests restore what a user would find in ``unsaved/``.
"""
import json

import pytest
import torch
from streamlit.testing.v1 import AppTest

from explorer.cli import main
from explorer.errors import ExplorerError
from explorer.models import build, load_model
from explorer.store import Run, RunStore, StoreError, keep_runs
from tests.apptest import goto, texts
from tests.storefaults import damage

SHAPE = {"input_shape": [1, 8, 8], "num_classes": 10}


def _run(sparsity=0.5, **values) -> Run:
    return Run("mlp", "digits", "unstructured", "magnitude", "local", sparsity,
               settings=dict(SHAPE), metrics={"accuracy": sparsity / 2}, **values)


def _refused(folder, model=None, sparsity=0.5):
    """A save into a damaged store: the run (and weights) land in ``folder/unsaved`` as the app leaves them."""
    damage(folder / "runs.sqlite")
    with pytest.raises(StoreError) as caught:
        RunStore(folder).save(_run(sparsity), model)
    (folder / "runs.sqlite").unlink()  # the user moves the damaged file away: a new, empty store
    return caught.value.kept


def test_a_refused_run_and_its_weights_go_back_into_the_store_once(tmp_path):
    model = build("mlp", (1, 8, 8), 10)
    kept = _refused(tmp_path, model)
    store = RunStore(tmp_path)
    assert store.kept_files() == [kept] and store.list() == []
    [run] = store.restore(kept)
    [listed] = store.list()
    assert listed.id == run.id and listed.metrics == {"accuracy": 0.25} and listed.sparsity == 0.5
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(load_model(store.weights_path(run.id))(x), model(x))
    assert store.kept_files() == [] and not kept.exists()
    assert (kept.parent / "restored" / kept.name).exists()  # moved, not deleted
    with pytest.raises(ExplorerError, match="There is no file"):
        store.restore(kept)
    assert len(store.list()) == 1


def test_a_run_stored_without_its_weights_gets_them_back_and_no_second_row(tmp_path):
    store = RunStore(tmp_path)
    model = build("mlp", (1, 8, 8), 10)
    run = store.save(_run())  # stored, then its weights refused (as `save` keeps them: run-<id>.json + .pt)
    kept = keep_runs([run], tmp_path, f"run-{run.id}", model, arch="mlp", **SHAPE)
    [again] = store.restore(kept)
    assert again.id == run.id and [r.id for r in store.list()] == [run.id]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_model(store.weights_path(run.id))(x), model(x))


def test_a_refusal_midway_leaves_only_the_rest_in_the_file(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    kept = keep_runs([_run(0.3), _run(0.6), _run(0.9)], tmp_path, "sweep-grid")  # a sweep keeps its points together
    saved = []
    real_save = RunStore.save

    def refuse_second(self, run, *args, **kwargs):
        if saved:
            raise StoreError("The run store is read-only.")
        saved.append(run)
        return real_save(self, run, *args, **kwargs)

    monkeypatch.setattr(RunStore, "save", refuse_second)
    with pytest.raises(StoreError, match="Restored 1 of 3 runs") as caught:
        store.restore(kept)
    assert "\n" not in str(caught.value)
    assert [entry["sparsity"] for entry in json.loads(kept.read_text())] == [0.6, 0.9]
    monkeypatch.setattr(RunStore, "save", real_save)
    store.restore(kept)
    assert sorted(run.sparsity for run in store.list()) == [0.3, 0.6, 0.9]  # each once


def test_weights_that_cannot_be_copied_leave_the_run_stored_once(tmp_path, monkeypatch):
    model = build("mlp", (1, 8, 8), 10)
    kept = _refused(tmp_path, model)
    store = RunStore(tmp_path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("explorer.store.shutil.copyfile", full)
    with pytest.raises(StoreError, match="No space left on device.*Restored 0 of 1 runs") as caught:
        store.restore(kept)
    assert "\n" not in str(caught.value) and kept.exists()
    monkeypatch.undo()
    [again] = store.restore(kept)
    assert [run.id for run in store.list()] == [again.id]  # the row stored before the copy failed, not a second
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_model(store.weights_path(again.id))(x), model(x))


@pytest.mark.parametrize("content", [b"\xff\x00 not json", b'{"model_name": "mlp"}', b'[{"model_name": "mlp"}]',
                                     b'[{"model_name": "mlp", "dataset": "d", "evil": 1}]', b"[1, 2]"])
def test_a_file_that_is_not_kept_runs_is_one_line(tmp_path, content):
    path = tmp_path / "unsaved" / "odd.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ExplorerError, match="is not a file of kept runs") as caught:
        RunStore(tmp_path).restore(path)
    assert "\n" not in str(caught.value) and path.exists()
    assert RunStore(tmp_path).list() == []


def test_cli_restores_every_kept_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))
    assert main(["restore"]) == 0
    assert "nothing to restore" in capsys.readouterr().out
    first = _refused(tmp_path, build("mlp", (1, 8, 8), 10), 0.4)
    second = _refused(tmp_path, None, 0.7)
    assert main(["restore"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"restored 1 run(s) from {first}: id 1; weights of run 1",
                     f"restored 1 run(s) from {second}: id 2"]
    assert [(run.id, run.sparsity) for run in RunStore(tmp_path).list()] == [(1, 0.4), (2, 0.7)]
    odd = tmp_path / "odd.json"
    odd.write_text("{}")
    assert main(["restore", str(odd)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a file of kept runs" in err and err.count("\n") == 1


def test_compare_puts_kept_runs_back_with_one_button(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))
    RunStore(tmp_path).save(_run(0.2))
    kept = keep_runs([_run(0.8)], tmp_path, "run-refused")
    at = goto(AppTest.from_file("../app.py", default_timeout=120).run(), "app_pages/compare.py")
    assert "1 file(s)" in texts(at.warning) and "run-refused.json" in texts(at.warning)
    assert len(at.dataframe[0].value) == 1
    at.button(key="cmp_restore").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "Restored 1 run(s): id 2." in texts(at.success) and "keep runs the store refused" not in texts(at.warning), texts(at.warning)
    assert sorted(at.dataframe[0].value["id"]) == [1, 2] and not kept.exists()
    assert sorted(run.sparsity for run in RunStore(tmp_path).list()) == [0.2, 0.8]
