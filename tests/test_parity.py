"""One experiment, one set of numbers: the app's Apply and the CLI agree on the same Recipe."""
import json

import pytest
from streamlit.testing.v1 import AppTest

from explorer.cli import main
from explorer.recipe import Recipe
from explorer.store import RunStore
from tests.apptest import set_sparsity


def cli_flags(recipe: Recipe) -> list[str]:
    """The ``prune`` flags that describe ``recipe`` (a zoo baseline on its dataset)."""
    flags = ["prune", "--model", recipe.model.source, "--data", recipe.model.data, "--baseline",
             "--structure", recipe.scoring.structure, "--criterion", recipe.scoring.criterion,
             "--calib-batches", str(recipe.scoring.calib_batches), "--scope", recipe.plan.scope,
             "--sparsity", str(recipe.plan.sparsity), "--min-keep", str(recipe.plan.min_keep),
             "--batch", str(recipe.measure.batch), "--measure", "--json"]
    if recipe.plan.protect:
        flags += ["--protect", *recipe.plan.protect]
    return flags


@pytest.mark.parametrize("structure,criterion", [("unstructured", "magnitude"), ("channel", "taylor")])
def test_the_app_and_the_cli_give_the_same_numbers_for_one_recipe(capsys, structure, criterion):
    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/prune.py").run()
    at.radio(key="prune_structure").set_value(structure).run()
    at.selectbox(key="prune_criterion").set_value(criterion).run()
    set_sparsity(at, 0.6)
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    app = at.session_state["pruned_result"]["metrics"]
    [run] = [r for r in RunStore().list() if r.id == at.session_state["pruned_result"]["run_id"]]
    recipe = Recipe.from_dict(run.recipe)  # what the run stored is enough to replay it
    assert (recipe.scoring.structure, recipe.scoring.criterion, recipe.plan.sparsity) == (structure, criterion, 0.6)

    assert main(cli_flags(recipe)) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["recipe"]["scoring"] == recipe.to_dict()["scoring"]
    assert cli["recipe"]["plan"] == recipe.to_dict()["plan"]
    assert cli["accuracy"]["pruned"] == app["accuracy"] and cli["accuracy"]["base"] == app["base_accuracy"]
    assert (cli["params"]["total"], cli["params"]["nonzero"]) == (app["params_total"], app["params_nonzero"])
    assert cli["flops"]["effective"] == app["flops_effective"]
    assert cli["speedup"]["flops"] == pytest.approx(app["speedup_flops"])
    assert cli["size_bytes"]["compressed"] == app["size_compressed_bytes"]
    latency = cli["latency_ms"]
    assert (latency["batch"], latency["threads"], latency["device"], latency["layout"]) == \
        (app["batch"], app["threads"], app["device"], app["layout"]) == (64, app["threads"], "cpu", "channels_last")  # digits are 1x8x8 images
    # Measured speed-ups are timings: they wobble with the machine's load, so only their presence and
    # the identical measurement setting are asserted here (test_pipeline checks no mask hook is timed).
    for measured in (cli["speedup"]["measured"], app["speedup_measured"]):
        assert isinstance(measured, float) and measured > 0
