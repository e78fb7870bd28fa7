"""The Streamlit app through AppTest: every page renders, the main path works, bad input is an error.

Runs the real script (app.py + app_pages/) in-process; conftest gives every test session its own
baseline cache and run database, so the first test trains the mlp/digits baseline once.
"""
import threading
import time

import pytest
import torch
from streamlit.testing.v1 import AppTest

from explorer import figures, jobs
from explorer.data import load_dataset
from explorer.models import build, save_model
from tests.apptest import goto, live_cards, set_sparsity, shown_sparsity, shown_view, texts, wait_for_job

PAGES = ["app_pages/model.py", "app_pages/inspect.py", "app_pages/prune.py", "app_pages/finetune.py", "app_pages/sensitivity.py",
         "app_pages/compare.py"]


def start() -> AppTest:
    """A fresh session on the Model page, which loads the default mlp on digits."""
    at = AppTest.from_file("../app.py", default_timeout=240).run()  # the first one trains the mlp baseline
    assert not at.exception, at.exception
    assert at.session_state["current_model"]["label"] == "mlp"
    return at


def test_every_page_renders_without_exception():
    at = start()
    assert "mlp" in texts(at.sidebar.markdown)
    assert at.dataframe[0].value["name"].tolist() == ["fc1", "fc2", "classifier"]
    for page in PAGES:
        goto(at, page)
        assert not at.error, texts(at.error)
        assert any(e.label == "What am I looking at?" for e in at.expander), page


def test_main_path_inspect_prune_finetune_compare():
    at = start()
    base_accuracy = at.session_state["current_model"]["base_accuracy"]
    assert base_accuracy > 0.9

    goto(at, "app_pages/inspect.py")
    at.button(key="inspect_collect").click().run()
    assert not at.exception and not at.error
    assert "inspect_gradients" in at.session_state

    goto(at, "app_pages/prune.py")
    assert at.radio(key="prune_scope").value == "global"
    set_sparsity(at, 0.8)
    metrics = live_cards(at)
    units = 64 * 256 + 256 * 128 + 128 * 10  # the mlp's weights on 8x8 digits
    assert metrics["Units pruned"] == f"{round(0.8 * units):,} / {units:,}"
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    pruned = at.session_state["pruned_result"]
    assert pruned["metrics"]["params_nonzero"] < 0.25 * pruned["metrics"]["params_total"]
    # the cached base model is shared between sessions and must not have been touched
    base = at.session_state["current_model"]["module"]
    assert float((base.fc1.weight == 0).float().mean()) < 0.01

    goto(at, "app_pages/finetune.py")
    at.number_input(key="ft_epochs").set_value(1)
    at.button(key="ft_start").click().run()
    wait_for_job(at, timeout=60)
    assert not at.exception and not at.error, texts(at.error)
    job = at.session_state["finetune_job"]
    assert job.result.epochs_done == 1 and not job.result.cancelled
    saved = job.meta["saved_run"]
    assert saved is not None
    assert "fine-tune 1 ep" in texts(at.success)

    goto(at, "app_pages/compare.py")
    table = at.dataframe[0].value.set_index("id")
    assert {pruned["run_id"], saved.id} <= set(table.index)  # other tests may have saved runs too
    assert table.loc[pruned["run_id"], "fine-tune epochs"] == 0
    tuned = table.loc[saved.id]
    assert tuned["fine-tune epochs"] == 1
    assert tuned["sparsity"] == pytest.approx(0.8)
    assert 0 < tuned["accuracy"] <= 1 and tuned["latency (ms)"] > 0
    assert tuned["speed-up FLOPs"] > 3  # 80 % of the weights gone: about 5x fewer effective FLOPs
    assert tuned["non-zero params"] == pruned["metrics"]["params_nonzero"]


def crafted_model_file(tmp_path) -> bytes:
    """An mlp whose fc2 weights are 1000x smaller than the rest: global magnitude pruning empties it."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build("mlp", data.input_shape, data.num_classes)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)
    path = save_model(model, tmp_path / "tiny_fc2.pt", arch="mlp", input_shape=data.input_shape,
                      num_classes=data.num_classes)
    return path.read_bytes()


def load_upload(at: AppTest, name: str, content: bytes) -> AppTest:
    at.radio(key="model_source").set_value("Model file").run()
    at.file_uploader(key="model_file").set_value((name, content, "application/octet-stream")).run()
    at.button(key="file_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_collapse_warning_and_one_click_fixes(tmp_path):
    at = load_upload(start(), "tiny_fc2.pt", crafted_model_file(tmp_path))
    assert at.session_state["current_model"]["label"] == "tiny_fc2.pt"
    goto(at, "app_pages/prune.py")
    set_sparsity(at, 0.8)
    warning = shown_view(at)["warning"]  # shown next to the slider the moment it reaches 0.8
    assert "Layer collapse" in warning and "`fc2`" in warning
    assert shown_view(at)["figure"]["data"][0]["marker"]["color"][1] == figures.COLLAPSED  # fc2's bar is red
    assert "empties `fc2` from" in texts(at.info)

    at.button(key="fix_local").click().run()
    assert at.radio(key="prune_scope").value == "local"
    assert not shown_view(at)["warning"] and shown_sparsity(at) == pytest.approx(0.8)

    at.radio(key="prune_scope").set_value("global").run()
    assert "Layer collapse" in shown_view(at)["warning"]
    at.button(key="fix_min_keep").click().run()
    assert at.slider(key="prune_min_keep").value == pytest.approx(0.05)
    assert not shown_view(at)["warning"]
    at.button(key="prune_apply").click().run()
    assert not at.error and at.session_state["pruned_result"]["metrics"]["params_nonzero"] > 0


def test_corrupt_upload_shows_error_not_traceback():
    at = load_upload(start(), "broken.pt", b"this is not a model file")
    assert at.error, "a corrupt file must give a message"
    assert "broken.pt" in texts(at.error)
    assert at.session_state["current_model"]["label"] == "mlp"  # the previous model is kept


def test_sparsity_one_shows_error_not_traceback():
    at = goto(start(), "app_pages/prune.py")
    set_sparsity(at, 1.0)
    assert "Layer collapse" in shown_view(at)["warning"]
    at.button(key="prune_apply").click().run()
    assert not at.exception
    assert "empties" in texts(at.error)
    assert "pruned_result" not in at.session_state


def test_channel_structure_shows_coupled_group():
    at = goto(start(), "app_pages/prune.py")
    at.radio(key="prune_structure").set_value("channel").run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Neurons in group"] == "256"  # fc1's neurons: a Linear's unit is a neuron
    # one fc1 neuron is its weight row and bias (64 + 1) plus its column in fc2 (128)
    assert metrics["Params per neuron, naive"] == "65"
    assert metrics["Params per neuron, real"] == "193"


def test_wait_for_job_fails_loudly_at_its_deadline():
    release = threading.Event()
    at = AppTest.from_file("../app.py")  # never run: only the helper is under test
    at.session_state["finetune_job"] = jobs.start(lambda context: release.wait(timeout=60))
    try:
        with pytest.raises(pytest.fail.Exception, match="not done after 0 s: 0% done, status 'running'"):
            wait_for_job(at, timeout=0)
        assert at.session_state["finetune_job"].cancelled
    finally:
        release.set()


def test_cancel_keeps_the_partial_result():
    at = goto(start(), "app_pages/prune.py")
    at.button(key="prune_apply").click().run()
    goto(at, "app_pages/finetune.py")
    at.number_input(key="ft_epochs").set_value(100)
    at.button(key="ft_start").click().run()
    job = at.session_state["finetune_job"]
    deadline = time.monotonic() + 30
    while not job.payload().get("step_loss"):
        assert not job.done and time.monotonic() < deadline, f"no training step: {job.status}, {job.error}"
        time.sleep(0.05)
    at.run()
    at.button(key="ft_cancel").click().run()
    job = wait_for_job(at)
    assert not at.exception and not at.error, texts(at.error)
    assert job.result.cancelled and job.result.steps > 0
    assert job.result.epochs_done < 100
    assert "(cancelled)" in job.meta["saved_run"].name
    assert "Cancelled after" in texts(at.warning)


def test_sessions_are_isolated_and_runs_persist():
    first = goto(start(), "app_pages/prune.py")
    set_sparsity(first, 0.3)
    first.button(key="prune_apply").click().run()
    run_name = first.session_state["pruned_result"]["run_name"]

    second = start()  # another browser session
    goto(second, "app_pages/prune.py")
    assert shown_sparsity(second) == pytest.approx(0.5)
    assert "pruned_result" not in second.session_state
    goto(second, "app_pages/finetune.py")
    assert "apply a plan on the Prune page first" in texts(second.info)
    goto(second, "app_pages/compare.py")  # but saved runs are on disk for everyone, across restarts
    assert run_name in second.dataframe[0].value["name"].tolist()


def test_choosing_an_architecture_picks_its_usual_dataset():
    at = start()
    at.selectbox(key="zoo_model").set_value("conv1d").run()
    assert at.selectbox(key="zoo_dataset").value == "mnist1d"
    assert not at.exception


def _npz_bytes(x, y) -> bytes:
    import io

    import numpy as np
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


def test_user_tensors_train_a_zoo_model_and_nan_data_is_refused():
    import numpy as np
    rng = np.random.default_rng(0)
    y = np.arange(200) % 3
    x = (rng.normal(size=(200, 1, 6)) + 3 * y[:, None, None]).astype(np.float32)  # separable by the mean
    at = start()
    at.selectbox(key="zoo_dataset").set_value("tensors").run()
    at.file_uploader(key="zoo_data").set_value(("mine.npz", _npz_bytes(x, y), "application/octet-stream")).run()
    at.button(key="zoo_load").click().run()
    assert not at.exception and not at.error, texts(at.error)
    current = at.session_state["current_model"]
    assert current["label"] == "mlp" and current["base_accuracy"] > 0.8

    bad = x.copy()
    bad[0, 0, 0] = np.nan
    at.file_uploader(key="zoo_data").set_value(("bad.npz", _npz_bytes(bad, y), "application/octet-stream")).run()
    assert not at.exception
    assert "NaN" in texts(at.error)


def test_the_per_layer_table_is_built_when_opened_and_counts_a_brute_force_global_cut():
    at = goto(start(), "app_pages/prune.py")
    set_sparsity(at, 0.7)
    assert not at.dataframe  # closed: nothing built on a slider move
    at.session_state["prune_table_open"] = True
    at.run()
    table = at.dataframe[0].value.set_index("layer")
    module = at.session_state["current_model"]["module"]
    weights = {name: module.get_submodule(name).weight.detach().abs().flatten() for name in table.index}
    everything = torch.cat(list(weights.values()))
    cut = everything.sort().values[round(0.7 * everything.numel()) - 1]  # the largest |w| that goes
    for name, w in weights.items():
        assert table.loc[name, "pruned"] == int((w <= cut).sum()), name
        assert table.loc[name, "units"] == w.numel()


def test_a_factory_whose_forward_fails_is_an_error_and_the_previous_model_stays(tmp_path, monkeypatch):
    (tmp_path / "ids_only.py").write_text(
        "import torch\n"
        "def make(input_shape=None, num_classes=None):\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Flatten(), torch.nn.Linear(4, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    at = start()
    at.radio(key="model_source").set_value("Python factory").run()
    at.text_input(key="factory_spec").set_value("ids_only:make").run()
    at.button(key="factory_load").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "'ids_only:make' failed on a float32 tensor" in at.error[0].value
    assert "\n" not in at.error[0].value and "token ids" in at.error[0].value
    assert at.session_state["current_model"]["label"] == "mlp"
