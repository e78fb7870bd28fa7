import dataclasses
import io
import json
import zipfile

import pytest
import yaml

from explorer import pipeline
from explorer.baselines import baseline
from explorer.cli import main
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.models import load_model
from explorer.recipe import Recipe, load_recipe, recipe_from_run, run_recipe, save_recipe
from explorer.store import Run, RunStore
from explorer.train import TrainConfig, evaluate


def test_recipe_validation_names_the_bad_setting(tmp_path):
    with pytest.raises(ExplorerError, match="unknown setting"):
        Recipe.from_dict({"model": "mlp", "sparsty": 0.5})
    with pytest.raises(ExplorerError, match="sparsity"):
        Recipe.from_dict({"model": "mlp", "sparsity": 1.5})
    with pytest.raises(ExplorerError, match="criterion"):
        Recipe.from_dict({"model": "mlp", "criterion": "oracle"})
    with pytest.raises(ExplorerError, match="fine-tune"):
        Recipe.from_dict({"model": "mlp", "finetune": {"epoch": 1}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ExplorerError, match="not valid YAML"):
        load_recipe(bad)
    recipe = Recipe.from_dict({"model": "mlp", "finetune": {"epochs": 1}, "protect": ["fc1"]})
    assert load_recipe(save_recipe(recipe, tmp_path / "r.yaml")) == recipe


def test_replaying_a_stored_run_gives_the_same_numbers(tmp_path):
    """What the app stores, downloaded as run.yaml, replays headless to the same accuracy."""
    data = load_dataset("digits")
    base = baseline("mlp", data).model
    prepared = pipeline.prepare(base, "unstructured", "taylor", dataset=data, calib_batches=2)
    plan = pipeline.preview(prepared, 0.7, "global", protect=["classifier"])
    direct = evaluate(pipeline.apply(base, prepared, plan), data, "test")["accuracy"]

    store = RunStore(tmp_path)
    settings = {"structure": "unstructured", "criterion": "taylor", "scope": "global", "sparsity": 0.7,
                "overrides": {}, "protect": ["classifier"], "min_keep": 0.0, "calib_batches": 2,
                "arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "model_source": "zoo"}
    run = store.save(Run("mlp", "digits", "unstructured", "taylor", "global", 0.7, settings=settings,
                         metrics={"accuracy": direct}))
    archive = zipfile.ZipFile(io.BytesIO(store.export(run.id)))
    path = tmp_path / "run.yaml"
    path.write_bytes(archive.read("run.yaml"))
    recipe = load_recipe(path)
    assert recipe.protect == ("classifier",) and recipe.calib_batches == 2
    replayed = run_recipe(dataclasses.replace(recipe, measure_latency=False))
    assert replayed["metrics"]["accuracy"] == pytest.approx(direct)
    assert replayed["plan"].pruned == plan.pruned


def test_runs_of_uploaded_files_are_not_replayable():
    with pytest.raises(ExplorerError, match="zoo model"):
        recipe_from_run({"dataset": "digits", "structure": "channel", "criterion": "magnitude", "scope": "local",
                         "sparsity": 0.5, "settings": {"arch": "mlp", "model_source": "file"}})


def test_cli_run_with_finetune_and_save(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mlp", "data": "digits", "structure": "channel",
                                      "scope": "local", "sparsity": 0.5,
                                      "finetune": {"epochs": 1, "lr": 0.001}}))
    saved = tmp_path / "pruned.pt"
    assert main(["run", "--recipe", str(recipe), "--no-latency", "--save", str(saved), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["history"]) == 1 and result["recipe"]["finetune"]["epochs"] == 1
    model = load_model(saved)
    data = load_dataset("digits")
    assert evaluate(model, data, "test")["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert model.fc1.out_features == 128
    assert TrainConfig(**result["recipe"]["finetune"]).epochs == 1
