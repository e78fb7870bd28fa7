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
