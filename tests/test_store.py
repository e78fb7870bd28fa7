import io
import json
import zipfile

import pytest
import torch

from explorer.errors import ExplorerError
from explorer.models import build, load_model
from explorer.store import Run, RunStore


def test_runs_survive_a_new_store_object(tmp_path):
    store = RunStore(tmp_path)
    model = build("mlp", (1, 8, 8), 10)
    run = store.save(Run("mlp", "digits", "unstructured", "magnitude", "global", 0.8,
                         settings={"input_shape": [1, 8, 8], "num_classes": 10},
                         metrics={"accuracy": 0.91}, history=[{"epoch": 1, "loss": 0.3}]), model)
    again = RunStore(tmp_path)  # as after a server restart
    stored = again.get(run.id)
    assert stored.metrics == {"accuracy": 0.91} and stored.history == [{"epoch": 1, "loss": 0.3}]
    assert stored.name.startswith(f"run {run.id}")
    loaded = load_model(again.weights_path(run.id))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert [r.id for r in again.list()] == [run.id]


def test_rename_delete_export(tmp_path):
    store = RunStore(tmp_path)
    model = build("mlp", (1, 8, 8), 10)
    run = store.save(Run("mlp", "digits", "channel", "taylor", "local", 0.5,
                         settings={"input_shape": [1, 8, 8], "num_classes": 10}), model)
    assert store.rename(run.id, "  best so far ").name == "best so far"
    with pytest.raises(ExplorerError):
        store.rename(run.id, "   ")
    archive = zipfile.ZipFile(io.BytesIO(store.export(run.id)))
    assert set(archive.namelist()) == {"run.json", "run.yaml", "model.pt"}
    assert json.loads(archive.read("run.json"))["criterion"] == "taylor"
    store.delete(run.id)
    assert store.list() == [] and not store.weights_path(run.id).exists()
    with pytest.raises(ExplorerError, match="no run"):
        store.get(run.id)


def test_a_fine_tune_run_is_named_after_itself_not_after_its_parent(tmp_path):
    store = RunStore(tmp_path)
    first = store.save(Run("mlp", "digits", "unstructured", "magnitude", "global", 0.8))
    second = store.save(Run("mlp", "digits", "unstructured", "magnitude", "global", 0.8, stage=1,
                            settings={"finetune": {"epochs_done": 1, "cancelled": True}}))
    assert first.name == "run 1: mlp unstructured magnitude global 80%"
    assert second.name == "run 2: mlp unstructured magnitude global 80% + fine-tune 1 ep (cancelled)"


def test_an_old_database_gains_the_sweep_column_and_filters_by_it(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "runs.sqlite") as db:  # the first release's table, one run in it
        db.execute("""CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, created REAL NOT NULL,
                      model_name TEXT, dataset TEXT, structure TEXT, criterion TEXT, scope TEXT, sparsity REAL,
                      settings TEXT, metrics TEXT, history TEXT)""")
        db.execute("INSERT INTO runs (name, created, model_name, dataset, structure, criterion, scope, sparsity, "
                   "settings, metrics, history) VALUES ('old', 1.0, 'mlp', 'digits', 'unstructured', 'magnitude', "
                   "'local', 0.5, '{}', '{}', '[]')")
    store = RunStore(tmp_path)
    old = store.list()[0]
    assert (old.name, old.sweep, old.recipe, old.stage) == ("old", "", {}, 0)
    store.save(Run("mlp", "digits", "unstructured", "taylor", "local", 0.8, sweep="grid-1"))
    store.save(Run("mlp", "digits", "unstructured", "magnitude", "local", 0.8, sweep="grid-2"))
    assert [run.criterion for run in store.list(sweep="grid-1")] == ["taylor"]
    assert store.sweeps() == ["grid-1", "grid-2"] and len(store.list()) == 3
