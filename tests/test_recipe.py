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
from explorer.specs import MeasureSpec, ModelSpec, PlanSpec, ScoringSpec
from explorer.store import Run, RunStore
from explorer.train import TrainConfig, evaluate


def test_recipe_validation_names_the_bad_setting(tmp_path):
    with pytest.raises(ExplorerError, match="unknown setting"):
        Recipe.from_dict({"model": "mlp", "sparsty": 0.5})
    with pytest.raises(ExplorerError, match=r"unknown setting\(s\) sparsty in 'plan'"):
        Recipe.from_dict({"model": "mlp", "plan": {"sparsty": 0.5}})
    with pytest.raises(ExplorerError, match=r"plan\.sparsity must be a number in \[0, 1\], got 1\.5"):
        Recipe.from_dict({"model": "mlp", "plan": {"sparsity": 1.5}})
    with pytest.raises(ExplorerError, match=r"scoring\.criterion 'oracle' is not one of magnitude"):
        Recipe.from_dict({"model": {"source": "mlp"}, "scoring": {"criterion": "oracle"}})
    with pytest.raises(ExplorerError, match=r"measure\.batch must be a whole number from 1 to 65,536"):
        Recipe.from_dict({"model": "mlp", "measure": {"batch": 0}})
    with pytest.raises(ExplorerError, match=r"method\.name 'lottery' is not one of one_shot"):
        Recipe.from_dict({"model": "mlp", "method": {"name": "lottery"}})
    with pytest.raises(ExplorerError, match=r"model\.data 'imagenet' is not one of"):
        Recipe.from_dict({"model": {"source": "mlp", "data": "imagenet"}})
    with pytest.raises(ExplorerError, match="'model' is required"):
        Recipe.from_dict({"plan": {"sparsity": 0.5}})
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
    prepared = pipeline.prepare(base, ScoringSpec("unstructured", "taylor", calib_batches=2), dataset=data)
    plan = pipeline.preview(prepared, PlanSpec(0.7, "global", protect=("classifier",)))
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
    assert recipe.plan.protect == ("classifier",) and recipe.scoring.calib_batches == 2
    replayed = run_recipe(recipe.replace(measure={"latency": False}))
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


def test_recipe_round_trips_through_yaml_and_json(tmp_path):
    recipe = Recipe(model=ModelSpec(source="lenet5", data="digits"),
                    scoring=ScoringSpec(structure="channel", criterion="taylor", calib_batches=2),
                    plan=PlanSpec(sparsity=0.4, scope="global", protect=("classifier.fc3",),
                                  overrides={"features.conv1": 0.1}, min_keep=0.05),
                    finetune=TrainConfig(epochs=2, lr=1e-3), measure=MeasureSpec(batch=32), seed=3).validate()
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert load_recipe(save_recipe(recipe, tmp_path / "r.yaml")) == recipe
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(tmp_path / "r.json") == recipe
    assert recipe.replace(plan={"sparsity": 0.6}).plan == PlanSpec(0.6, "global", ("classifier.fc3",),
                                                                   {"features.conv1": 0.1}, 0.05)


def test_numbers_written_the_usual_way_in_yaml_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: mlp\nfinetune: {epochs: 1, lr: 1e-3}\nplan: {sparsity: 5e-1}\n")
    recipe = load_recipe(path)  # YAML 1.1 reads 1e-3 as text
    assert recipe.finetune.lr == 0.001 and recipe.plan.sparsity == 0.5
    path.write_text("model: mlp\nfinetune: {lr: fast}\n")
    with pytest.raises(ExplorerError, match="lr"):
        load_recipe(path)


def test_old_flat_recipes_still_load_as_the_same_experiment(tmp_path):
    flat = {"model": "lenet5", "data": "digits", "structure": "channel", "criterion": "taylor", "scope": "global",
            "sparsity": 0.5, "min_keep": 0.1, "protect": ["classifier.fc3"], "calib_batches": 2,
            "measure_latency": False, "finetune": {"epochs": 2, "lr": 0.001}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(flat))
    recipe = load_recipe(path)
    assert recipe == Recipe(model=ModelSpec(source="lenet5", data="digits"),
                            scoring=ScoringSpec(structure="channel", criterion="taylor", calib_batches=2),
                            plan=PlanSpec(sparsity=0.5, scope="global", protect=("classifier.fc3",), min_keep=0.1),
                            finetune=TrainConfig(epochs=2, lr=0.001), measure=MeasureSpec(latency=False))


def test_a_run_stores_its_full_recipe_and_replays_from_it(tmp_path):
    recipe = Recipe(model=ModelSpec(source="mlp", baseline=False),
                    scoring=ScoringSpec(structure="unstructured", criterion="random"),
                    plan=PlanSpec(sparsity=0.6, scope="global"), measure=MeasureSpec(latency=False), seed=5)
    first = run_recipe(recipe)
    store = RunStore(tmp_path)
    run = store.save(Run.from_recipe(recipe, model_name="mlp", dataset="digits", metrics=first["metrics"]))
    stored = RunStore(tmp_path).get(run.id)
    assert (stored.structure, stored.criterion, stored.scope, stored.sparsity) == ("unstructured", "random",
                                                                                   "global", 0.6)
    assert stored.stage == 0 and stored.trajectory == []
    again = run_recipe(Recipe.from_dict(stored.recipe))
    assert again["metrics"]["accuracy"] == first["metrics"]["accuracy"]
    assert again["plan"].pruned == first["plan"].pruned == round(0.6 * first["plan"].total)


def test_a_store_written_before_recipes_is_migrated_and_its_runs_replay(tmp_path):
    """An old database (no recipe / stage / trajectory columns) opens, lists and replays."""
    import sqlite3

    with sqlite3.connect(tmp_path / "runs.sqlite") as db:
        db.execute("""CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, created REAL NOT NULL,
            model_name TEXT, dataset TEXT, structure TEXT, criterion TEXT, scope TEXT, sparsity REAL,
            settings TEXT, metrics TEXT, history TEXT)""")
        settings = {"protect": ["classifier"], "calib_batches": 2, "arch": "mlp", "model_source": "zoo"}
        db.execute("INSERT INTO runs (name, created, model_name, dataset, structure, criterion, scope, sparsity, "
                   "settings, metrics, history) VALUES ('old', 1.0, 'mlp', 'digits', 'unstructured', 'magnitude', "
                   "'local', 0.3, ?, '{}', '[]')", (json.dumps(settings),))
    store = RunStore(tmp_path)
    [old] = store.list()
    assert old.recipe == {} and old.stage == 0 and old.trajectory == []
    recipe = recipe_from_run(old.to_dict())
    assert recipe.plan == PlanSpec(0.3, "local", ("classifier",)) and recipe.scoring.calib_batches == 2
    new = store.save(Run.from_recipe(recipe, model_name="mlp", dataset="digits"))
    assert Recipe.from_dict(store.get(new.id).recipe) == recipe
