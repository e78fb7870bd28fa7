"""Every control that no other AppTest pressed, pressed here, with the numbers it changes checked
against an independent computation (a brute-force cut, a direct evaluation, torch on the weights, the store).

Inventory (issue 18): page -> control (key) -> the test that presses it. "here" is this file.

| page        | control                                     | pressed by                                              |
|-------------|---------------------------------------------|---------------------------------------------------------|
| Model       | model_source radio                          | test_app.load_upload, test_app_transformers, here       |
| Model       | zoo_model, zoo_dataset, zoo_data, zoo_load  | test_app (usual dataset, user tensors)                  |
| Model       | model_file, file_load                       | test_app.load_upload, test_hostile_files                |
| Model       | file_arch, file_epochs                      | here: test_model_file_state_dict_with_architecture_...  |
| Model       | file_factory, file_trust                    | test_hostile_files                                      |
| Model       | factory_spec, factory_epochs, factory_load  | test_app, test_app_transformers                         |
| Model       | tf_model, tf_folder, tf_load                | test_app_transformers, test_hostile_files               |
| Model       | tf_text ("my text file"), tf_data           | here: test_transformer_on_an_uploaded_text_file_...     |
| Model       | model_compat                                | test_compat (vit_small's report, against the core's)    |
| Inspect     | inspect_bins, inspect_log, inspect_shared   | here: test_inspect_histograms_...                       |
| Inspect     | inspect_layers (multiselect)                | here: test_inspect_histograms_...                       |
| Inspect     | inspect_calib, inspect_collect              | test_app (main path), here: test_inspect_gradients_...  |
| Inspect     | inspect_which (pruned copy)                 | here: test_inspect_pruned_copy_...                      |
| Inspect     | inspect_block, inspect_block_value          | here: test_inspect_blocks_of_resnet20_...               |
| Inspect     | inspect_attr_layer, inspect_attr            | test_app_numbers (every zoo model, against captum)      |
| Prune       | prune_structure, prune_criterion, prune_nm  | test_app, test_app_transformers, test_url_state         |
| Prune       | prune_scope, fix_local, fix_min_keep        | test_app (collapse), test_url_state, test_live_slider   |
| Prune       | live slider (prune_sparsity)                | tests/apptest.set_sparsity (test_app, test_live_slider) |
| Prune       | prune_protect, prune_override_layers,       | here: test_prune_protect_override_and_min_keep_...      |
|             | prune_override_<layer>, prune_min_keep      |                                                         |
| Prune       | prune_round_to (channel structure)          | here: test_prune_round_to_rounds_each_layers_kept_...   |
| Prune       | prune_calib (criterion with data)           | here: test_prune_calibration_batches_...                |
| Prune       | prune_include_head, prune_calib_shape,      | test_app_transformers: test_prune_page_llm_expander_... |
|             | prune_calib_samples/_seqlen/_mode,          |                                                         |
|             | prune_sequential (LLMs)                     |                                                         |
| Prune       | prune_table_open (per-layer table)          | test_app (brute-force global cut), here                 |
| Prune       | prune_group_layer                           | test_app_numbers, test_app_transformers                 |
| Prune       | prune_apply                                 | test_app and most page tests, here                      |
| Prune       | prune_apply_cancel                          | test_pipeline_progress (Apply cancelled mid-evaluation) |
|             |                                             | test_app_lean (a causal LM's lean prune cancelled)      |
| Prune       | prune_lean_local (LLM scores beyond memory) | test_app_lean                                           |
| Prune       | prune_scoring_cancel, prune_score_again     | test_pipeline_progress (switch of structure cancelled;  |
|             |                                             | a first scoring cancelled, then scored on the button)   |
| Inspect     | inspect_cut_cancel                          | test_pipeline_progress (histograms without the cut)     |
| Fine-tune   | ft_epochs, ft_batch, ft_start, ft_cancel    | test_app, test_app_transformers                         |
| Fine-tune   | ft_lr, ft_optimizer, ft_device, ft_loss     | here: test_finetune_distill_with_sgd_...                |
| Methods     | methods_structure/sparsity/chosen/epochs/   | test_methods_page                                       |
|             | batch, methods_start, methods_view,         |                                                         |
|             | methods_start_epochs                        |                                                         |
| Methods     | methods_criterion, methods_scope,           | here: test_methods_local_scope_lr_and_cancel_...        |
|             | methods_lr, methods_cancel                  |                                                         |
| Sensitivity | sens_structure/samples/grid/latency/start,  | test_app_sensitivity                                    |
|             | sens_cancel, sens_goal, sens_target(_flops),|                                                         |
|             | sens_check, sens_load                       |                                                         |
| Sensitivity | sens_criterion, sens_split, sens_whole,     | here: test_sensitivity_whole_test_split_...             |
|             | sens_max_drop_points, sens_curve_units,     |                                                         |
|             | sens_download                               |                                                         |
| Tour        | tour_what, tour_decide, tour_time           | test_tour, here (the coupled group against a removal)   |
| Compare     | cmp_model, cmp_metric                       | test_app_transformers                                   |
| Compare     | cmp_sweep                                   | test_sweep, here                                        |
| Compare     | cmp_sweep_x, cmp_sweep_color                | here: test_compare_plots_a_sweep_along_the_field_...    |
| Compare     | cmp_run, cmp_name_<id>, cmp_rename,         | here: test_compare_rename_download_and_delete_...       |
|             | cmp_download, cmp_delete                    |                                                         |
| Compare     | cmp_traj                                    | test_methods_page (default), here (a pick)              |
| Compare     | cmp_restore                                 | test_restore                                            |
| Deploy      | deploy_runtimes, deploy_batches,            | test_app_deploy (every control, numbers against ONNX    |
|             | deploy_max_s, deploy_time, deploy_export,   | Runtime sessions, file sizes, weight counts opened      |
|             | deploy_sparse_batch, deploy_sparse,         | there); deploy_download_<format>: labels and files      |
|             | deploy_int8, deploy_what, deploy_run        | checked (AppTest cannot save a download)                |
| Deploy      | deploy_cancel (timing, export)              | test_app_deploy (rows done / files written kept)        |

Page links (st.page_link) are navigation, not computation; AppTest cannot follow them (goto() switches pages).
"""
import io
import json
import math
import re
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from streamlit.testing.v1 import AppTest

from explorer.data import load_dataset
from explorer.models import build
from explorer.store import RunStore
from tests.apptest import goto, live_cards, set_sparsity, texts, wait_for_job
from tests.test_app_numbers import _untrained_entry

TIMEOUT = 300  # model loading, baselines and scoring take longer than AppTest's 3 s default on a busy machine


@pytest.fixture(autouse=True)
def own_run_store(tmp_path, monkeypatch):
    """A run database of each test's own: the runs, trajectories and sweeps saved here must not show up on the
    Compare page of later tests (which count them); trained baselines stay shared through conftest's cache."""
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))


def start() -> AppTest:
    """A fresh session on the Model page, which loads the default mlp on digits."""
    at = AppTest.from_file("../app.py", default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["current_model"]["label"] == "mlp"
    return at


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    return at


def chart(at: AppTest, key: str) -> dict:
    """The plotly figure (as JSON) of the chart with this key."""
    found = [c for c in at.get("plotly_chart") if key in str(c.proto.id)]
    assert len(found) == 1, f"{len(found)} charts with key {key!r}"
    return json.loads(found[0].proto.spec)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def direct_accuracy(module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``y`` the module's argmax gets right, in one forward pass."""
    with torch.no_grad():
        return float((module.eval()(x).argmax(1) == y).double().mean())


def weights_of(module, names) -> dict[str, torch.Tensor]:
    """The (masked) weight each layer computes with, read through the module attribute."""
    return {name: module.get_submodule(name).weight.detach().double().flatten() for name in names}


# ---------------------------------------------------------------------------------------------- Model
def test_model_file_state_dict_with_architecture_and_training_epochs_is_measured_directly(tmp_path):
    data = load_dataset("digits")
    torch.manual_seed(0)
    saved = build("mlp", data.input_shape, data.num_classes)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)  # a plain state dict: the file does not say what it belongs to
    at = start()
    at.radio(key="model_source").set_value("Model file").run()
    at.file_uploader(key="model_file").set_value(("weights.pt", buffer.getvalue(), "application/octet-stream")).run()
    at.selectbox(key="file_arch").set_value("mlp").run()
    at.button(key="file_load").click().run()
    ok(at)
    loaded = at.session_state["current_model"]
    assert (loaded["label"], loaded["arch"], loaded["spec"].train_epochs) == ("weights.pt", "mlp", 0)
    for name, value in saved.state_dict().items():  # used as is: the very weights of the file
        assert torch.equal(loaded["module"].state_dict()[name], value), name
    accuracy = direct_accuracy(loaded["module"], data.x_test, data.y_test)
    shown = metrics(at)
    assert shown["Baseline accuracy (test)"] == f"{100 * accuracy:.1f} %"
    assert shown["Parameters"] == f"{sum(p.numel() for p in saved.parameters()):,}"

    at.number_input(key="file_epochs").set_value(2).run()
    at.button(key="file_load").click().run()
    ok(at)
    trained = at.session_state["current_model"]
    assert trained["spec"].train_epochs == 2 and trained["key"] != loaded["key"]
    assert not torch.equal(trained["module"].fc1.weight, saved.fc1.weight)  # trained before pruning
    accuracy = direct_accuracy(trained["module"], data.x_test, data.y_test)
    assert accuracy > 0.5  # two epochs on digits lift an untrained mlp well above chance (10 %)
    assert trained["base_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics(at)["Baseline accuracy (test)"] == f"{100 * accuracy:.1f} %"


def test_transformer_on_an_uploaded_text_file_splits_it_and_scores_its_labels_directly():
    lines = [json.dumps({"text": f"{'good great fine' if i % 2 else 'bad awful poor'} example number {i}",
                         "label": "pos" if i % 2 else "neg"}) for i in range(40)]
    at = AppTest.from_file("../app.py", default_timeout=TIMEOUT)
    at.session_state["model_autoloaded"] = True  # no mlp baseline first
    at.run()
    at.radio(key="model_source").set_value("Transformer").run()
    at.selectbox(key="tf_model").set_value("tiny_bert").run()
    at.radio(key="tf_text").set_value("my text file").run()
    assert at.button(key="tf_load").disabled  # no file yet
    at.file_uploader(key="tf_data").set_value(("reviews.jsonl", "\n".join(lines).encode(), "application/json")).run()
    at.button(key="tf_load").click().run()
    ok(at)
    model = at.session_state["current_model"]
    data = model["dataset"]
    assert (model["label"], model["spec"].data_file, data.num_classes) == ("tiny_bert", "reviews.jsonl", 2)
    assert model["task"]["name"] == "accuracy"  # a labelled file makes the transformer a classifier
    assert metrics(at)["Train / val / test"] == f"{round(0.8 * 40)} / {round(0.1 * 40)} / {40 - 32 - 4}"
    assert sorted(torch.cat([data.y_train, data.y_val, data.y_test]).tolist()) == [0] * 20 + [1] * 20
    accuracy = direct_accuracy(model["module"], data.x_test, data.y_test)
    assert model["task"]["base"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics(at)["Baseline accuracy (test)"] == f"{100 * accuracy:.1f} %"


# ---------------------------------------------------------------------------------------------- Inspect
def test_inspect_histograms_follow_bins_log_count_shared_axis_and_the_chosen_layers():
    at = goto(start(), "app_pages/inspect.py")
    at.slider(key="inspect_bins").set_value(20).run()
    at.toggle(key="inspect_log").set_value(True).run()
    at.toggle(key="inspect_shared").set_value(True).run()
    at.multiselect(key="inspect_layers").set_value(["fc2", "classifier"]).run()
    ok(at)
    weights = weights_of(at.session_state["current_model"]["module"], ("fc1", "fc2", "classifier"))
    low = min(float(w.min()) for w in weights.values())
    high = max(float(w.max()) for w in weights.values())  # shared: one range over every layer, fc1 included

    figure = chart(at, "inspect_weights")
    bars = [trace for trace in figure["data"] if trace["type"] == "bar"]
    assert [bar["name"] for bar in bars] == ["fc2", "classifier"]
    for bar in bars:
        expected, _ = np.histogram(weights[bar["name"]].numpy(), bins=20, range=(low, high))
        shown = np.array(bar["y"])
        assert len(shown) == 20 and shown.sum() == weights[bar["name"]].numel()
        assert np.abs(shown - expected).max() <= 1, bar["name"]  # a value on a bin edge may land either side
        assert bar["x"][0] == pytest.approx(low + (high - low) / 40)  # the first bin's centre, same for both
    axes = [figure["layout"]["yaxis" + bar.get("yaxis", "y")[1:]] for bar in bars]  # the subplots drawn
    assert [axis.get("type") for axis in axes] == ["log", "log"]

    table = at.dataframe[0].value.set_index("layer")
    for name, w in weights.items():
        assert table.loc[name, "mean |w|"] == pytest.approx(float(w.abs().mean()), rel=1e-9)
        assert table.loc[name, "std of w"] == pytest.approx(float(w.std()), rel=1e-9)
        assert table.loc[name, "zeros"] == float((w == 0).double().mean())


def test_inspect_gradients_are_the_mean_cross_entropy_gradient_over_the_calibration_batches():
    at = goto(start(), "app_pages/inspect.py")
    at.slider(key="inspect_calib").set_value(2).run()
    at.button(key="inspect_collect").click().run()
    ok(at)
    model = at.session_state["current_model"]
    module = model["module"]
    names = ("fc1", "fc2", "classifier")
    params = [module.get_submodule(name).weight for name in names]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    batches = model["dataset"].calibration(2, 64)
    for x, y in batches:  # the derivative of the mean cross-entropy, batch by batch, then averaged
        grads = torch.autograd.grad(F.cross_entropy(module.eval()(x), y), params)
        sums = [s + g.double() for s, g in zip(sums, grads)]
    table = at.dataframe[0].value.set_index("layer")
    for name, total in zip(names, sums):
        assert table.loc[name, "mean |g|"] == pytest.approx(float((total / len(batches)).abs().mean()), rel=1e-4)
    assert "Gradient distributions (mean over 2 batches)" in json.dumps(chart(at, "inspect_grads")["layout"])


def test_inspect_pruned_copy_shows_the_zeros_of_a_global_cut():
    at = goto(start(), "app_pages/prune.py")
    set_sparsity(at, 0.8)
    at.button(key="prune_apply").click().run()
    ok(goto(at, "app_pages/inspect.py"))
    base = at.dataframe[0].value.set_index("layer")
    assert (base["zeros"] < 0.01).all()  # the base model: trained weights, hardly any exact zero
    at.radio(key="inspect_which").set_value("pruned copy").run()
    ok(at)
    table = at.dataframe[0].value.set_index("layer")
    units = 64 * 256 + 256 * 128 + 128 * 10
    zeros_shown = sum(table.loc[name, "zeros"] * size for name, size in
                      (("fc1", 64 * 256), ("fc2", 256 * 128), ("classifier", 128 * 10)))
    assert round(zeros_shown) == round(0.8 * units)  # global: exactly round(S * N) weights, wherever they are
    pruned = weights_of(at.session_state["pruned_result"]["module"], table.index)
    for name, w in pruned.items():
        assert table.loc[name, "zeros"] == pytest.approx(float((w == 0).double().mean()), abs=1e-12)
    assert "pruned copy" in json.dumps(chart(at, "inspect_weights")["layout"]["title"])


def test_inspect_blocks_of_resnet20_group_layers_and_tabulate_each_role():
    entry = _untrained_entry("resnet20")
    at = AppTest.from_file("../app.py", default_timeout=TIMEOUT)
    at.session_state["current_model"] = entry
    goto(at, "app_pages/inspect.py")
    assert at.selectbox(key="inspect_block").value == "(outside blocks)"  # conv1 and fc: no numbered block
    at.selectbox(key="inspect_block").set_value("layer2.0").run()
    ok(at)
    in_block = ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.conv"]
    assert at.multiselect(key="inspect_layers_layer2.0").value == in_block
    assert at.dataframe[0].value["layer"].tolist() == in_block  # the summary table follows the block
    at.radio(key="inspect_block_value").set_value("std of w").run()
    ok(at)
    assert len(at.dataframe) == 2  # the layer summary, then the per-block table
    block_table = at.dataframe[1].value
    module = entry["module"]
    assert list(block_table.index) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)]
    for block in block_table.index:
        for role in ("conv1", "conv2"):
            w = module.get_submodule(f"{block}.{role}").weight.detach().double()
            assert block_table.loc[block, role] == pytest.approx(float(w.std()), rel=1e-9), (block, role)
    shortcut = module.get_submodule("layer3.0.shortcut.conv").weight.detach().double()
    assert block_table.loc["layer3.0", "shortcut.conv"] == pytest.approx(float(shortcut.std()), rel=1e-9)
    assert math.isnan(block_table.loc["layer1.0", "shortcut.conv"])  # stage 1 keeps its width: no shortcut conv


# ---------------------------------------------------------------------------------------------- Prune
MLP_SIZES = {"fc1": 64 * 256, "fc2": 256 * 128, "classifier": 128 * 10}  # the mlp's weights on 8x8 digits


def open_table(at: AppTest):
    at.session_state["prune_table_open"] = True
    at.run()
    ok(at)
    return at.dataframe[0].value.set_index("layer")


def lowest_global(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, int]:
    """Brute force: sort every unit of these layers together, count where the round(S * N) lowest sit."""
    names = list(scores)
    everything = torch.cat([scores[n].flatten().double() for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    lowest = owner[torch.argsort(everything, stable=True)[:round(fraction * everything.numel())]]
    return {n: int((lowest == i).sum()) for i, n in enumerate(names)}


def test_prune_protect_override_and_min_keep_plan_and_apply_what_a_brute_force_cut_says():
    at = goto(start(), "app_pages/prune.py")
    module = at.session_state["current_model"]["module"]
    magnitudes = {name: w.abs() for name, w in weights_of(module, MLP_SIZES).items()}
    set_sparsity(at, 0.6)
    at.multiselect(key="prune_protect").set_value(["classifier"]).run()
    table = open_table(at)
    expected = lowest_global({n: magnitudes[n] for n in ("fc1", "fc2")}, 0.6)  # the pool without the classifier
    assert table.loc["classifier", "pruned"] == 0 and table.loc["classifier", "rule"] == "protected"
    for name in ("fc1", "fc2"):
        assert table.loc[name, "pruned"] == expected[name], name

    at.multiselect(key="prune_override_layers").set_value(["fc2"]).run()
    at.slider(key="prune_override_fc2").set_value(0.9).run()
    table = open_table(at)
    assert table.loc["fc2", "pruned"] == round(0.9 * MLP_SIZES["fc2"]) and table.loc["fc2", "rule"] == "override"
    assert table.loc["fc1", "pruned"] == round(0.6 * MLP_SIZES["fc1"])  # alone in the global pool now

    at.radio(key="prune_scope").set_value("local").run()
    set_sparsity(at, 0.8)
    at.slider(key="prune_min_keep").set_value(0.3).run()
    table = open_table(at)
    fc1 = min(round(0.8 * MLP_SIZES["fc1"]), MLP_SIZES["fc1"] - math.ceil(0.3 * MLP_SIZES["fc1"]))
    assert fc1 < round(0.8 * MLP_SIZES["fc1"])  # min_keep binds
    counts = {"fc1": fc1, "fc2": round(0.9 * MLP_SIZES["fc2"]), "classifier": 0}
    assert {name: table.loc[name, "pruned"] for name in counts} == counts
    assert live_cards(at)["Units pruned"] == f"{sum(counts.values()):,} / {sum(MLP_SIZES.values()):,}"

    at.button(key="prune_apply").click().run()
    ok(at)
    pruned = weights_of(at.session_state["pruned_result"]["module"], MLP_SIZES)
    for name, count in counts.items():
        zeros = pruned[name] == 0
        assert int(zeros.sum()) == count, name
        # each layer lost its own smallest |w|: every zeroed weight is below every kept one
        if 0 < count < MLP_SIZES[name]:
            assert float(magnitudes[name][zeros].max()) <= float(magnitudes[name][~zeros].min()), name
    stored = RunStore().get(at.session_state["pruned_result"]["run_id"])
    assert stored.metrics["params_nonzero"] == sum(p.numel() for p in module.parameters()) - sum(counts.values())
    assert stored.recipe["plan"]["protect"] == ["classifier"] and stored.recipe["plan"]["min_keep"] == 0.3


def test_prune_round_to_rounds_each_layers_kept_channels_and_apply_removes_exactly_those():
    at = goto(start(), "app_pages/prune.py")
    at.radio(key="prune_structure").set_value("channel").run()
    at.radio(key="prune_scope").set_value("local").run()
    set_sparsity(at, 0.55)
    units = {"fc1": 256, "fc2": 128}  # the mlp's hidden neurons; local 55 %: 115 and 58 kept
    unrounded = {name: total - round(0.55 * total) for name, total in units.items()}
    table = open_table(at)
    assert {name: table.loc[name, "kept"] for name in units} == unrounded
    at.selectbox(key="prune_round_to").set_value(8).run()
    table = open_table(at)
    kept = {name: int(table.loc[name, "kept"]) for name in units}
    assert kept == {"fc1": 112, "fc2": 56}  # the nearest multiples of 8 of 115 and 58, worked by hand
    assert live_cards(at)["Units pruned"] == f"{sum(units.values()) - sum(kept.values()):,} / {sum(units.values()):,}"
    assert at.query_params["round_to"] == "8"  # the link keeps it
    at.button(key="prune_apply").click().run()
    ok(at)
    module = at.session_state["pruned_result"]["module"]
    assert {name: getattr(module, name).out_features for name in units} == kept  # a real removal, as planned
    assert at.session_state["pruned_result"]["recipe"].plan.round_to == 8
    at.radio(key="prune_structure").set_value("unstructured").run()  # no channels to round: no control
    assert not [box for box in at.selectbox if box.key == "prune_round_to"]


def test_prune_calibration_batches_change_the_gradient_scores_as_a_direct_sum_says():
    at = goto(start(), "app_pages/prune.py")
    at.selectbox(key="prune_criterion").set_value("gradient").run()
    at.slider(key="prune_calib").set_value(2).run()
    set_sparsity(at, 0.5)
    table = open_table(at)
    model = at.session_state["current_model"]
    module = model["module"].eval()
    params = [module.get_submodule(name).weight for name in MLP_SIZES]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for x, y in model["dataset"].calibration(2, 64, seed=0):  # |dL/dw| summed over the two batches
        grads = torch.autograd.grad(F.cross_entropy(module(x), y), params)
        sums = [s + g.abs().double() for s, g in zip(sums, grads)]
    expected = lowest_global(dict(zip(MLP_SIZES, sums)), 0.5)
    assert sum(table["pruned"]) == sum(expected.values())
    for name in MLP_SIZES:  # float32 sums in another order may swap a unit or two at the cut
        assert abs(table.loc[name, "pruned"] - expected[name]) <= 2, (name, table.loc[name, "pruned"], expected)
    assert any(spec.calib_batches == 2 and spec.criterion == "gradient"
               for _, spec in at.session_state["prepared_cache"])


# ---------------------------------------------------------------------------------------------- Fine-tune
def test_finetune_distill_with_sgd_keeps_the_zeros_and_reports_a_direct_evaluation():
    at = goto(start(), "app_pages/prune.py")
    set_sparsity(at, 0.7)
    at.button(key="prune_apply").click().run()
    goto(at, "app_pages/finetune.py")
    at.number_input(key="ft_epochs").set_value(1)
    at.number_input(key="ft_lr").set_value(0.05)
    at.selectbox(key="ft_optimizer").set_value("sgd")
    at.selectbox(key="ft_device").set_value("cpu")
    at.selectbox(key="ft_loss").set_value("distill")
    at.button(key="ft_start").click().run()
    job = wait_for_job(at, timeout=180)
    ok(at)
    assert "Training loss: **distill**" in texts(at.caption)
    config = job.meta["config"]
    assert (config.loss, config.optimizer, config.lr, config.device, config.epochs) == ("distill", "sgd", 0.05, "cpu", 1)
    data = at.session_state["current_model"]["dataset"]
    tuned = job.result.model
    accuracy = direct_accuracy(tuned, data.x_test, data.y_test)
    saved = RunStore().get(job.meta["saved_run"].id)
    assert saved.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics(at)["Accuracy after fine-tune"] == f"{100 * accuracy:.1f} %"
    zeros = sum(int((w == 0).sum()) for w in weights_of(tuned, MLP_SIZES).values())
    assert zeros == round(0.7 * sum(MLP_SIZES.values()))  # the masks stayed in force while training
    assert saved.recipe["finetune"]["optimizer"] == "sgd" and saved.recipe["finetune"]["loss"] == "distill"


# ---------------------------------------------------------------------------------------------- Methods
def test_methods_local_scope_lr_and_cancel_are_what_ran_and_what_compare_draws():
    at = AppTest.from_file("../app.py", default_timeout=TIMEOUT).run()
    goto(at, "app_pages/methods.py")
    at.selectbox(key="methods_criterion").set_value("random")
    at.selectbox(key="methods_scope").set_value("local")
    at.slider(key="methods_sparsity").set_value(0.5)
    at.number_input(key="methods_lr").set_value(0.01)
    at.number_input(key="methods_epochs").set_value(1)
    at.multiselect(key="methods_chosen").set_value(["one_shot"])
    at.button(key="methods_start").click().run()
    job = wait_for_job(at, key="methods_job", timeout=240, what="methods lab")
    ok(at)
    (result,) = job.result
    recipe = job.meta["recipe"]
    assert (recipe.scoring.criterion, recipe.plan.scope, recipe.finetune.lr) == ("random", "local", 0.01)
    pruned = weights_of(result.model, MLP_SIZES)
    for name, w in pruned.items():  # local: every layer loses the same fraction
        assert int((w == 0).sum()) == round(0.5 * MLP_SIZES[name]), name
    table = at.dataframe[0].value
    row = table[table["run"] == result.run_id].iloc[0]
    assert row["sparsity reached"] == pytest.approx(sum(round(0.5 * n) for n in MLP_SIZES.values())
                                                    / sum(MLP_SIZES.values()), abs=1e-6)
    data = at.session_state["current_model"]["dataset"]
    assert row["accuracy"] == pytest.approx(direct_accuracy(result.model, data.x_test, data.y_test), abs=1e-9)

    at.multiselect(key="methods_chosen").set_value(["one_shot", "iterative"])
    at.number_input(key="methods_epochs").set_value(100)
    at.button(key="methods_start").click().run()
    running = at.session_state["methods_job"]
    assert running is not job and not running.done
    at.button(key="methods_cancel").click().run()
    cancelled = wait_for_job(at, key="methods_job", timeout=240, what="methods lab")
    assert not at.exception, [e.value for e in at.exception]
    assert cancelled.cancelled
    assert "Cancelled: the method that was running was measured" in texts(at.warning)
    assert len(cancelled.result) <= 1 and all(r.method == "one_shot" for r in cancelled.result)
    if cancelled.result:  # cancelled inside one_shot: measured as it stood and saved
        assert cancelled.result[0].cancelled and RunStore().get(cancelled.result[0].run_id)

    goto(at, "app_pages/compare.py")
    at.multiselect(key="cmp_traj").set_value([result.run_id]).run()
    ok(at)
    names = {trace["name"] for trace in chart(at, "cmp_trajectories")["data"]}
    assert names == {RunStore().get(result.run_id).name}


# ---------------------------------------------------------------------------------------------- Sensitivity
def test_sensitivity_whole_test_split_random_criterion_and_a_drop_budget_match_direct_evaluations():
    at = goto(start(), "app_pages/sensitivity.py")
    at.selectbox(key="sens_criterion").set_value("random")
    at.radio(key="sens_split").set_value("test")
    at.checkbox(key="sens_whole").check()
    at.multiselect(key="sens_grid").set_value([0.5, 1.0])
    at.button(key="sens_start").click().run()
    job = wait_for_job(at, "sensitivity_job", 180, "scan")
    ok(at)
    model = at.session_state["current_model"]
    module, data = model["module"], model["dataset"]
    scan = job.result["scan"]
    assert (scan.criterion, scan.split, scan.samples) == ("random", "test", len(data.y_test))
    assert scan.base == pytest.approx(direct_accuracy(module, data.x_test, data.y_test), abs=1e-12)
    drops = {(cell.unit, cell.sparsity): cell.drop for cell in scan.cells}
    for name in MLP_SIZES:  # at 100 % the criterion does not matter: the layer's weights are all zero
        emptied = build("mlp", data.input_shape, data.num_classes)
        emptied.load_state_dict(module.state_dict())
        with torch.no_grad():
            emptied.get_submodule(name).weight.zero_()
        assert drops[(name, 1.0)] == pytest.approx(scan.base - direct_accuracy(emptied, data.x_test, data.y_test),
                                                   abs=1e-12), name
    order = at.dataframe[0].value.set_index("unit")
    for name in MLP_SIZES:  # trapezoids from (0, 0) through the 50 % and 100 % cells
        area = 0.5 * drops[(name, 0.5)] / 2 + 0.5 * (drops[(name, 0.5)] + drops[(name, 1.0)]) / 2
        # in points, as the cards: the mean drop over 0-100 % is the area divided by 1.0
        assert order.loc[name, "mean drop, 0-100%"] == pytest.approx(100 * area, abs=1e-10), name
        assert order.loc[name, "drop at 100%"] == pytest.approx(100 * drops[(name, 1.0)], abs=1e-10)
    assert list(order.index) == sorted(MLP_SIZES, key=lambda n: order.loc[n, "mean drop, 0-100%"])
    formats = {name: column["type_config"].get("format")
               for name, column in json.loads(at.dataframe[0].proto.columns).items() if "type_config" in column}
    assert formats["mean drop, 0-100%"] == formats["drop at 100%"] == "%.1f pts"  # one way, as '-3.7 pts' on the cards

    at.number_input(key="sens_max_drop_points").set_value(2.0).run()
    ok(at)
    chosen = at.dataframe[1].value
    assert set(chosen["sparsity"]) <= {0.0, 0.5, 1.0}
    total_drop = sum(drops.get((unit, value), 0.0) for unit, value in zip(chosen["unit"], chosen["sparsity"]))
    assert total_drop <= 0.02 + 1e-9 and chosen["sparsity"].sum() > 0  # spent within the 2-point budget
    assert metrics(at)["Predicted accuracy"] == f"{100 * (scan.base - total_drop):.1f} %"
    recipe = yaml.safe_load(at.code[0].value)  # what the download button carries, shown under it
    sparsities = dict(zip(chosen["unit"], chosen["sparsity"]))
    assert recipe["scoring"]["criterion"] == "random" and recipe["plan"]["scope"] == "local"
    assert recipe["plan"]["overrides"] == sparsities and set(sparsities) == set(MLP_SIZES)  # every unit, 0 too
    at.get("download_button")[0].click().run()  # on_click="ignore": a download changes nothing on the page
    ok(at)

    robust = list(order.index)[0]
    at.multiselect(key="sens_curve_units").set_value([robust]).run()
    ok(at)
    assert [trace["name"] for trace in chart(at, "sens_curves")["data"]] == [robust]


# ---------------------------------------------------------------------------------------------- Compare
def test_compare_rename_download_and_delete_act_on_the_store(monkeypatch, tmp_path):
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.testing.v1 import app_test

    from explorer.errors import ExplorerError
    from explorer.models import load_model

    storages = []  # AppTest makes a fresh in-memory media store per run: keep them to read the download's bytes

    class Recording(MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            storages.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recording)
    at = goto(start(), "app_pages/prune.py")
    ids = []
    for sparsity in (0.3, 0.6):
        set_sparsity(at, sparsity)
        at.button(key="prune_apply").click().run()
        ok(at)
        ids.append(at.session_state["pruned_result"]["run_id"])
    first, second = ids
    goto(at, "app_pages/compare.py")
    at.selectbox(key="cmp_run").set_value(first).run()
    at.text_input(key=f"cmp_name_{first}").set_value("renamed by a test").run()
    at.button(key="cmp_rename").click().run()
    ok(at)
    assert RunStore().get(first).name == "renamed by a test"
    assert at.dataframe[0].value.set_index("id").loc[first, "name"] == "renamed by a test"

    (button,) = [b for b in at.get("download_button") if "cmp_download" in b.proto.id]
    filename = button.proto.url.rsplit("/", 1)[-1]
    archive = zipfile.ZipFile(io.BytesIO(storages[-1].get_file(filename).content))
    assert {"run.json", "run.yaml", "model.pt"} <= set(archive.namelist())
    described = json.loads(archive.read("run.json"))
    stored = RunStore().get(first)
    assert described["name"] == "renamed by a test" and described["metrics"] == json.loads(json.dumps(stored.metrics))
    (tmp_path / "model.pt").write_bytes(archive.read("model.pt"))
    data = at.session_state["current_model"]["dataset"]
    weights = load_model(str(tmp_path / "model.pt"), input_shape=data.input_shape, num_classes=data.num_classes)
    nonzero = sum(int((p != 0).sum()) for p in weights.parameters())
    assert nonzero == stored.metrics["params_nonzero"]  # the downloaded weights are the run's, zeros and all
    assert sum(int((w == 0).sum()) for w in weights_of(weights, MLP_SIZES).values()) == \
        round(0.3 * sum(MLP_SIZES.values()))

    at.selectbox(key="cmp_run").set_value(second).run()
    at.button(key="cmp_delete").click().run()
    ok(at)
    with pytest.raises(ExplorerError, match="no run"):
        RunStore().get(second)
    assert second not in set(at.dataframe[0].value["id"]) and first in set(at.dataframe[0].value["id"])



def test_compare_plots_a_sweep_along_the_field_and_lines_the_user_picks():
    from explorer.recipe import Recipe
    from explorer.store import Run
    from tests.test_app_transformers import numbers

    store = RunStore()
    accuracy = {("magnitude", 0.5): 0.96, ("magnitude", 0.8): 0.90, ("taylor", 0.5): 0.94, ("taylor", 0.8): 0.70}
    for (criterion, sparsity), value in accuracy.items():  # a sweep's points, stored as `explorer sweep` stores them
        recipe = Recipe.from_dict({"model": {"source": "mlp", "data": "digits"}, "measure": {"latency": False},
                                   "scoring": {"criterion": criterion}, "plan": {"sparsity": sparsity}})
        point = {"scoring.criterion": criterion, "plan.sparsity": sparsity}
        store.save(Run.from_recipe(recipe, model_name="mlp", dataset="digits", sweep="controls-grid",
                                   settings={"sweep": {"id": "controls-grid", "index": 0, "point": point}},
                                   metrics={"accuracy": value, "base_accuracy": 0.97, "sparsity_actual": sparsity,
                                            "task": {"name": "accuracy", "measure": "accuracy", "base": 0.97,
                                                     "pruned": value}}))
    at = goto(start(), "app_pages/compare.py")
    at.selectbox(key="cmp_sweep").set_value("controls-grid").run()
    at.selectbox(key="cmp_sweep_x").set_value("scoring.criterion").run()
    at.selectbox(key="cmp_sweep_color").set_value("plan.sparsity").run()
    ok(at)
    lines = {trace["name"]: dict(zip(trace["x"], numbers(trace["y"])))
             for trace in chart(at, "cmp_sweep_chart")["data"]}
    assert lines == {str(s): {c: accuracy[(c, s)] for c in ("magnitude", "taylor")} for s in (0.5, 0.8)}
    at.selectbox(key="cmp_sweep_color").set_value("none").run()
    ok(at)
    (line,) = chart(at, "cmp_sweep_chart")["data"]
    assert sorted(zip(line["x"], numbers(line["y"]))) == sorted((c, v) for (c, _), v in accuracy.items())

def test_compare_says_which_stored_runs_sit_at_chance_from_their_numbers():
    from explorer.recipe import Recipe
    from explorer.store import Run

    store = RunStore()
    recipe = Recipe.from_dict({"model": {"source": "mlp", "data": "digits"}, "measure": {"latency": False}})
    def point(loss, accuracy):
        return {"step": 60, "epoch": 3, "sparsity": 0.9, "train_loss": loss, "val_accuracy": accuracy, "event": "epoch"}

    for name, accuracy, trajectory in [("learned", 0.91, [point(0.3, 0.9)]), ("stuck", 0.094, [point(2.302, 0.1)]),
                                       ("cut only", 0.12, [])]:
        store.save(Run.from_recipe(recipe, model_name="mlp", dataset="digits", name=name, trajectory=trajectory,
                                   settings={"num_classes": 10},
                                   metrics={"accuracy": accuracy, "base_accuracy": 0.97, "sparsity_actual": 0.9,
                                            "task": {"name": "accuracy", "measure": "accuracy", "base": 0.97,
                                                     "pruned": accuracy}}))
    at = goto(start(), "app_pages/compare.py")
    warned = {w.value.split(" ended at chance")[0]: w.value for w in at.warning if " ended at chance" in w.value}
    assert set(warned) == {"stuck", "cut only"}  # within 1.5 x 1/10 of the 10 digits; 91 % is not
    assert "test accuracy 9.4% (chance 10.0%); the training loss ended at 2.30 (ln 10 = 2.30)" in warned["stuck"]
    assert "test accuracy 12.0%" in warned["cut only"] and "not trained after the cut" in warned["cut only"]


# ---------------------------------------------------------------------------------------------- Tour
def _zero_lowest(module, data, fraction: float, scope: str):
    """A copy of the mlp with the lowest |w| zeroed by hand: per layer (local) or over all layers (global)."""
    copy = build("mlp", data.input_shape, data.num_classes)
    copy.load_state_dict(module.state_dict())
    weights = [copy.get_submodule(name).weight for name in MLP_SIZES]
    with torch.no_grad():
        if scope == "local":
            for w in weights:
                w.view(-1)[torch.argsort(w.abs().flatten(), stable=True)[:round(fraction * w.numel())]] = 0
        else:
            flat = torch.cat([w.abs().flatten() for w in weights])
            cut = torch.zeros(flat.numel(), dtype=torch.bool)
            cut[torch.argsort(flat, stable=True)[:round(fraction * flat.numel())]] = True
            for w, part in zip(weights, cut.split([w.numel() for w in weights])):
                w.view(-1)[part] = 0
    return copy


def test_tour_what_and_decide_show_a_real_removal_and_accuracies_of_cuts_made_by_hand():
    from explorer import structural

    at = goto(start(), "app_pages/tour.py")
    at.button(key="tour_what").click().run()
    at.button(key="tour_decide").click().run()
    ok(at)
    model = at.session_state["current_model"]
    module, data = model["module"], model["dataset"]

    what = at.dataframe[0].value.set_index("label")
    by_hand = _zero_lowest(module, data, 0.9, "local")
    assert what.loc["unstructured 90%", "accuracy"] == pytest.approx(
        direct_accuracy(by_hand, data.x_test, data.y_test), abs=1e-12)
    assert what.loc["unstructured 90%", "speedup_flops"] == pytest.approx(
        sum(MLP_SIZES.values()) / sum(n - round(0.9 * n) for n in MLP_SIZES.values()), rel=0.02)
    text = next(m.value for m in at.markdown if "A channel is never removed alone" in m.value)
    root, real = re.search(r"rooted at `([\w.]+)`.*?really takes \*\*([\d,]+)\*\*", text).groups()
    one = structural.apply(module, {root: torch.tensor([0])}, data.example_input(1))
    assert int(real.replace(",", "")) == sum(p.numel() for p in module.parameters()) - \
        sum(p.numel() for p in one.parameters())

    decide = at.dataframe[1].value.set_index("criterion")
    by_hand = _zero_lowest(module, data, 0.8, "global")
    assert decide.loc["magnitude", "accuracy"] == pytest.approx(
        direct_accuracy(by_hand, data.x_test, data.y_test), abs=1e-12)
