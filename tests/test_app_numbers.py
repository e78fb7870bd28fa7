"""Numbers the Inspect and Prune pages show, checked against an independent computation.

Inspect's conductance against captum's own ``LayerConductance`` (the core reimplements captum's
quadrature for all layers at once), pressed for every zoo model; Prune's coupled-group cost
against a real removal counted by brute force.
"""
import json
import re

import pytest
import torch
from streamlit.testing.v1 import AppTest

from app_pages import common
from explorer import criteria, structural, zoo
from explorer.data import load_dataset
from explorer.specs import ModelSpec
from tests.apptest import goto, texts


def _untrained_entry(name: str) -> dict:
    """A session-model entry for a seeded, untrained zoo model: conductance needs no training."""
    dataset_name = zoo.ZOO[name].default_dataset
    dataset = load_dataset(dataset_name)
    torch.manual_seed(0)
    module = zoo.build(name, dataset.input_shape, dataset.num_classes).eval()
    return {"module": module, "label": name, "arch": name, "dataset": dataset, "source": "zoo",
            "spec": ModelSpec(source=name, data=dataset_name, baseline=False), "base_accuracy": None,
            "task": common.accuracy_task(None), "key": f"untrained:{name}:{dataset_name}", "origin": "untrained"}


def _captum_conductance(module, layer_name: str, calib) -> torch.Tensor:
    """Mean |conductance| per output unit straight from captum: per example, over positions, then examples."""
    from captum.attr import LayerConductance

    layer = dict(module.named_modules())[layer_name]
    conductance = LayerConductance(module, layer)
    sums, examples = 0, 0
    for inputs, labels in calib:
        values = conductance.attribute(inputs, target=labels, n_steps=criteria.CONDUCTANCE_STEPS,
                                       method="gausslegendre").detach().abs()
        if values.dim() > 2:  # over positions: a Linear's channels are last (tokens), a conv's second
            values = (values.movedim(-1, 1) if isinstance(layer, torch.nn.Linear) else values).flatten(2).mean(2)
        sums = sums + values.sum(0)
        examples += len(inputs)
    return sums / examples


def _press_conductance(name: str):
    entry = _untrained_entry(name)
    at = AppTest.from_file("../app.py", default_timeout=240)
    at.session_state["current_model"] = entry
    goto(at, "app_pages/inspect.py")
    at.slider(key="inspect_calib").set_value(1).run()
    # captum hooks a layer's own forward, which an attention's out_proj never runs (the core hooks the attention)
    layers = [name for name in at.selectbox(key="inspect_attr_layer").options if not name.endswith("out_proj")]
    layer = layers[len(layers) // 2]
    at.selectbox(key="inspect_attr_layer").set_value(layer).run()
    at.button(key="inspect_attr").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    return at, entry, layer


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_inspect_conductance_works_for_every_zoo_model_and_matches_captum(name):
    at, entry, layer = _press_conductance(name)
    chart = next(c for c in at.get("plotly_chart") if "inspect_attr_chart" in str(c.proto.id))
    shown = torch.tensor(json.loads(chart.proto.spec)["data"][0]["y"], dtype=torch.float64)
    expected = _captum_conductance(entry["module"], layer, entry["dataset"].calibration(1, 64)).double()
    assert shown.shape == expected.shape
    torch.testing.assert_close(shown, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()) + 1e-9)
    caption = next(c.value for c in at.caption if c.value.startswith("Lowest-attribution units"))
    lowest = [int(u) for u in re.match(r"Lowest-attribution units: ([\d, ]+)\.", caption).group(1).split(", ")]
    torch.testing.assert_close(expected[lowest].sort().values, expected.sort().values[:len(lowest)],
                               rtol=1e-3, atol=1e-4 * float(expected.abs().max()) + 1e-9)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_prune_shows_the_coupled_cost_of_a_real_removal_for_lenet5_conv2():
    at = AppTest.from_file("../app.py", default_timeout=240)
    for key, value in {"model": "lenet5", "data": "digits", "structure": "channel", "criterion": "magnitude",
                       "scope": "local", "sparsity": "0.5"}.items():
        at.query_params[key] = value
    at.switch_page("app_pages/prune.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.selectbox(key="prune_group_layer").set_value("features.conv2").run()
    assert not at.exception and not at.error, texts(at.error)
    model = at.session_state["current_model"]
    module, example = model["module"], model["dataset"].example_input(1)

    one = structural.apply(module, {"features.conv2": torch.tensor([3])}, example)
    per_channel = _params(module) - _params(one)
    assert per_channel == 631  # 6*5*5 + 1 of the filter, 4 fc1 inputs (2x2 after the flatten) of 120
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Params per channel, real"] == f"{per_channel:,}"
    assert metrics["Params per channel, naive"] == "151"

    caption = next(c.value for c in at.caption if "Removing" in c.value)
    removed, freed = re.search(r"Removing (\d+) channel\(s\) frees ([\d,]+) parameters", caption).groups()
    assert int(removed) == 8  # half of conv2's 16 channels at local 50 %
    several = structural.apply(module, {"features.conv2": torch.arange(0, 16, 2)}, example)
    assert int(freed.replace(",", "")) == _params(module) - _params(several) == 8 * 631
