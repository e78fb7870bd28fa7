"""Long steps report progress and can be cancelled, keeping what was done (issue 21, item 2): the measurement's
stages, and the Prune page's Apply with its Cancel button."""
import threading

import pytest
import torch

from explorer import pipeline
from explorer.data import load_dataset
from explorer.layers import prunable_layers
from explorer.specs import MeasureSpec, PlanSpec, ScoringSpec
from explorer.zoo import build


@pytest.fixture(scope="module")
def pruned_mlp():
    data = load_dataset("digits")
    torch.manual_seed(0)
    base = build("mlp", data.input_shape, data.num_classes).eval()
    prepared = pipeline.prepare(base, ScoringSpec("unstructured", "magnitude"), dataset=data)
    return base, pipeline.apply(base, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local"))), data


def stages_until(stop_at: str | None):
    """A progress callback that records the stages and sets the cancel flag when ``stop_at`` starts."""
    cancel, seen = threading.Event(), []

    def progress(fraction: float, line: str) -> None:
        seen.append((fraction, line))
        if stop_at is not None and line == pipeline.MEASURE_STAGES[stop_at]:
            cancel.set()
    return progress, cancel, seen


def test_a_full_measurement_reports_its_stages_in_order(pruned_mlp):
    base, pruned, data = pruned_mlp
    progress, cancel, seen = stages_until(None)
    metrics = pipeline.measure_run(base, pruned, data, MeasureSpec(min_run_time=0.05), progress=progress, cancel=cancel)
    assert [line for _, line in seen] == list(pipeline.MEASURE_STAGES.values())
    assert [fraction for fraction, _ in seen] == sorted(fraction for fraction, _ in seen)
    assert metrics["cancelled"] is None and metrics["latency_ms"] > 0 and metrics["accuracy"] is not None


def test_a_cancel_during_latency_keeps_the_counts_and_the_accuracy(pruned_mlp):
    base, pruned, data = pruned_mlp
    progress, cancel, _ = stages_until("evaluate")  # set while evaluating: latency is the stage skipped
    metrics = pipeline.measure_run(base, pruned, data, MeasureSpec(min_run_time=0.05), progress=progress, cancel=cancel)
    assert metrics["cancelled"] == "latency" and metrics["latency_ms"] is None and metrics["speedup_measured"] is None
    correct = sum(int((pruned(x).argmax(1) == y).sum()) for x, y in [(data.x_test, data.y_test)])
    assert metrics["accuracy"] == pytest.approx(correct / len(data.y_test))
    weights = sum(layer.weight.numel() for _, layer in prunable_layers(base))
    assert metrics["params_nonzero"] <= metrics["params_total"] - weights // 2


def test_a_cancel_before_evaluation_keeps_the_counts_only(pruned_mlp):
    base, pruned, data = pruned_mlp
    progress, cancel, _ = stages_until("size")
    metrics = pipeline.measure_run(base, pruned, data, MeasureSpec(min_run_time=0.05), progress=progress, cancel=cancel,
                                   base_accuracy=0.9)
    assert metrics["cancelled"] == "evaluate" and metrics["accuracy"] is None and metrics["latency_ms"] is None
    assert metrics["task"]["pruned"] is None and metrics["task"]["base"] == 0.9
    assert metrics["speedup_flops"] > 1 and 0.45 < metrics["sparsity_actual"] < 0.55


def test_apply_shows_its_stage_and_cancel_keeps_the_pruned_copy_with_what_was_measured(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from explorer.store import RunStore
    from tests.apptest import set_sparsity, texts

    real = pipeline.measure_run

    def held_at_evaluation(*args, progress=None, cancel=None, **kwargs):
        def gate(fraction, line):
            progress(fraction, line)
            if line == pipeline.MEASURE_STAGES["evaluate"]:
                cancel.wait(120)  # the user presses Cancel while the accuracy is computed
        return real(*args, progress=gate, cancel=cancel, **kwargs)

    monkeypatch.setattr(pipeline, "measure_run", held_at_evaluation)
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.query_params.update(model="mlp", data="digits", scope="local")
    at.switch_page("app_pages/prune.py").run()  # the baseline trains (if it must) while the script waits
    set_sparsity(at, 0.5)
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)  # now the script hands back at once, showing the bar and Cancel
    at.button(key="prune_apply").click().run()
    job = at.session_state["apply_job"]
    for _ in range(200):  # until the job reaches the held stage
        if job.status == pipeline.MEASURE_STAGES["evaluate"]:
            break
        job.wait(0.05)
    at.run()
    assert at.button(key="prune_apply").disabled
    bars = list(at.get("progress"))
    assert bars and "Apply: Evaluating" in bars[0].text
    at.button(key="prune_apply_cancel").click().run()
    assert job.wait(120) and job.cancelled
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    pruned = at.session_state["pruned_result"]
    assert "Measurement cancelled" in texts(at.warning) and "latency not measured" in texts(at.warning)
    stored = RunStore().get(pruned["run_id"]).metrics
    assert stored["cancelled"] == "latency" and stored["latency_ms"] is None and stored["accuracy"] is not None
    weights = [layer.weight.detach() for _, layer in prunable_layers(pruned["module"])]
    assert sum(int((w == 0).sum()) for w in weights) == sum(round(0.5 * w.numel()) for w in weights)
    assert "apply_job" not in at.session_state


def test_the_cli_prints_its_stages_on_stderr_and_ctrl_c_keeps_what_was_measured(capsys, monkeypatch):
    import json
    import os
    import signal

    from explorer.cli import main

    real = pipeline.measure_run

    def interrupted_at_latency(*args, progress=None, **kwargs):
        def gate(fraction, line):
            progress(fraction, line)
            if line == pipeline.MEASURE_STAGES["evaluate"]:
                os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the accuracy is computed
        return real(*args, progress=gate, **kwargs)

    monkeypatch.setattr(pipeline, "measure_run", interrupted_at_latency)
    code = main(["prune", "--model", "mlp", "--structure", "unstructured", "--scope", "local",
                 "--sparsity", "0.3,0.6", "--measure", "--progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 1  # the second sparsity is not started
    assert results[0]["cancelled"].startswith("interrupted: latency") and "latency_ms" not in results[0]
    assert results[0]["accuracy"]["pruned"] is not None and results[0]["params"]["nonzero"] < results[0]["params"]["total"]
    lines = err.splitlines()
    assert any(line.endswith(f"] [1/2 sparsity 0.3] {pipeline.MEASURE_STAGES['size']} (0%)") for line in lines)
    assert any(f"] [1/2 sparsity 0.3] {pipeline.MEASURE_STAGES['evaluate']}" in line for line in lines)
    assert not any("[2/2" in line for line in lines)
    assert any(line.startswith("interrupted: finishing the current stage") for line in lines)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C quits again afterwards


def test_a_first_baseline_shows_its_bar_and_cancel_keeps_the_partly_trained_model(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from explorer import baselines

    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path / "empty-cache"))  # nothing trained yet
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)
    real = baselines.baseline

    def held(*args, progress=None, cancel=None, **kwargs):
        def report(step):
            progress(step)
            cancel.wait(120)  # the user presses Cancel during the first epoch
        return real(*args, progress=report, cancel=cancel, **kwargs)

    monkeypatch.setattr(baselines, "baseline", held)
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.query_params.update(model="lenet5", data="digits")
    at.switch_page("app_pages/inspect.py").run()
    job = at.session_state["baseline_job"]
    assert "current_model" not in at.session_state
    assert any("Training the lenet5 baseline on digits" in bar.text for bar in at.get("progress"))
    at.button(key="baseline_cancel").click().run()
    assert job.wait(120) and job.cancelled
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    model = at.session_state["current_model"]
    assert model["label"] == "lenet5" and "training cancelled after" in model["origin"]  # the link's model, not mlp
    assert not list((tmp_path / "empty-cache").glob("*.pt"))  # a partly trained model is never cached
    assert "baseline_job" not in at.session_state


def test_a_factory_trains_with_a_cancel_that_keeps_the_partly_trained_model(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from tests.apptest import goto

    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)
    at = AppTest.from_file("../app.py", default_timeout=300).run()
    at.radio(key="model_source").set_value("Python factory").run()
    at.text_input(key="factory_spec").set_value("explorer.zoo:mlp")
    at.number_input(key="factory_epochs").set_value(50)
    at.button(key="factory_load").click().run()
    job = at.session_state["model_train_job"]
    assert any(bar.text.startswith("Training: ") for bar in at.get("progress"))
    at.button(key="model_train_cancel").click().run()
    assert job.wait(120) and job.cancelled
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    model = at.session_state["current_model"]
    assert model["label"] == "explorer.zoo:mlp" and "training cancelled after" in model["origin"]
    assert "of 50 epochs" in model["origin"] and "model_train_job" not in at.session_state
    goto(at, "app_pages/prune.py")  # the partly trained model is the session's
    assert at.session_state["current_model"]["label"] == "explorer.zoo:mlp"


def test_prepare_reports_its_stages_and_a_cancel_stops_it_between_layers():
    data = load_dataset("digits")
    torch.manual_seed(0)
    base = build("mlp", data.input_shape, data.num_classes).eval()
    seen, cancel = [], threading.Event()

    def progress(fraction: float, line: str) -> None:
        seen.append((fraction, line))
        if line.startswith("2:4 pattern: ") and len([s for s in seen if s[1].startswith("2:4")]) == 2:
            cancel.set()  # the user cancels while the second layer gets its pattern

    with pytest.raises(pipeline.ScoringCancelled):
        pipeline.prepare(base, ScoringSpec("nm", "magnitude", nm="2:4"), dataset=data, progress=progress, cancel=cancel)
    assert [line for _, line in seen][-2:] == [f"2:4 pattern: {name}" for name, _ in prunable_layers(base)][:2]
    assert [fraction for fraction, _ in seen] == sorted(fraction for fraction, _ in seen)
    seen.clear()
    prepared = pipeline.prepare(base, ScoringSpec("nm", "magnitude", nm="2:4"), dataset=data, progress=progress)
    assert seen[-1] == (1.0, "ranked") and prepared.nm == (2, 4)  # uncancelled: every stage, up to the ranking


def _held_scoring(monkeypatch, structure: str, times: int = 1):
    """pipeline.prepare as it is, except that scoring ``structure`` waits at its first report for the Cancel
    (the first ``times`` times); returns the list of the structures scored."""
    real, scored = pipeline.prepare, []
    REACHED.clear()

    def held(model, scoring, *, progress=None, cancel=None, **kwargs):
        scored.append(scoring.structure)
        hold = scoring.structure == structure and scored.count(structure) <= times

        def gate(fraction, line):
            progress(fraction, line)
            if hold:
                REACHED.set()
                cancel.wait(120)  # the user presses Cancel while the scores are computed
        return real(model, scoring, progress=gate, cancel=cancel, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", held)
    return scored


def _scoring_job(at, timeout: float = 300):
    """The page's scoring job, once the script reaches it (a baseline that must train first is waited for)."""
    import time

    deadline = time.monotonic() + timeout
    while "prepare_job" not in at.session_state:
        assert not at.exception, [e.value for e in at.exception]
        assert time.monotonic() < deadline, f"no scoring started: {[bar.text for bar in at.get('progress')]}"
        if "baseline_job" in at.session_state:
            at.session_state["baseline_job"].wait(5)
        at.run()
    return at.session_state["prepare_job"]


REACHED = threading.Event()  # set when a held scoring reaches its first report


def _until_held(job):
    assert REACHED.wait(120), f"the scoring did not reach its first report: {job.status}"


def test_a_switch_of_structure_shows_its_scoring_and_cancel_keeps_the_plan_shown_before(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from tests.apptest import shown_view, texts

    scored = _held_scoring(monkeypatch, "channel")
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.query_params.update(model="mlp", data="digits", scope="local", sparsity="0.3")
    at.switch_page("app_pages/prune.py").run()  # the baseline trains (if it must), unstructured scores
    assert not at.exception, [e.value for e in at.exception]
    before = shown_view(at)["figure"]
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)  # the script hands back at once, showing the bar and Cancel
    at.radio(key="prune_structure").set_value("channel").run()
    job = at.session_state["prepare_job"]
    _until_held(job)
    at.run()
    assert any(bar.text.startswith("Scoring channel units by magnitude: ") for bar in at.get("progress"))
    at.button(key="prune_scoring_cancel").click().run()
    assert job.wait(120) and job.cancelled and job.result is None
    if "prepare_job" in at.session_state:  # the click's run handed back before the job stopped
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="prune_structure").value == "unstructured"
    assert "Scoring channel units by magnitude cancelled: the unstructured / magnitude plan shown before is kept" \
        in texts(at.info)
    assert at.session_state["recipe"].scoring.structure == "unstructured" and "prepare_job" not in at.session_state
    assert not any(key[1].structure == "channel" for key in at.session_state["prepared_cache"])
    assert shown_view(at)["figure"] == before  # the same plan, ready for Apply, without scoring it again
    assert scored == ["unstructured", "channel"]


def test_a_first_scoring_cancelled_waits_for_a_click_then_scores(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from tests.apptest import live_cards, texts

    scored = _held_scoring(monkeypatch, "channel", times=1)
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.query_params.update(model="mlp", data="digits", structure="channel", scope="local", sparsity="0.5")
    at.switch_page("app_pages/prune.py").run()
    job = _scoring_job(at)
    _until_held(job)
    at.run()
    at.button(key="prune_scoring_cancel").click().run()
    assert job.wait(120) and job.cancelled
    if "prepare_job" in at.session_state:
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Scoring channel units by magnitude was cancelled" in texts(at.info)
    assert at.radio(key="prune_structure").value == "channel" and scored == ["channel"]  # not scored again by itself
    monkeypatch.setattr(common, "JOB_WAIT_S", 3600.0)
    at.button(key="prune_score_again").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert scored == ["channel", "channel"] and "was cancelled" not in texts(at.info)
    assert live_cards(at)["Units pruned"].startswith("192")  # the mlp's 256 + 128 hidden channels, half removed


def test_inspect_draws_its_histograms_without_the_cut_when_its_scoring_is_cancelled(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from tests.apptest import texts

    _held_scoring(monkeypatch, "unstructured")
    monkeypatch.setattr(common, "JOB_WAIT_S", 0.0)
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.query_params.update(model="mlp", data="digits")
    at.switch_page("app_pages/inspect.py").run()
    job = _scoring_job(at)  # the held scoring of the |w| cut
    _until_held(job)
    at.run()
    at.button(key="inspect_cut_cancel").click().run()
    assert job.wait(120) and job.cancelled
    if "prepare_job" in at.session_state:
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "No pruning threshold to draw: the scoring was cancelled" in texts(at.warning)
    charts = {chart.proto.id for chart in at.get("plotly_chart")}
    assert any("inspect_weights" in chart_id for chart_id in charts)  # the histograms, without the red cut


def test_the_cli_prints_a_first_baselines_epochs(capsys, monkeypatch, tmp_path):
    """`prune --baseline --progress` on a cold cache printed 'loading the model and data', then nothing while the baseline
    trained; it now prints the training's epochs."""
    from explorer import baselines
    from explorer.cli import main
    from explorer.train import TrainConfig

    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(baselines, "default_config", lambda *args, **kwargs: TrainConfig(epochs=2, lr=1e-3))
    assert main(["prune", "--model", "mlp", "--baseline", "--sparsity", "0.5", "--plan-only", "--progress", "--json"]) == 0
    lines = capsys.readouterr().err.splitlines()
    trained = [line for line in lines if "training the mlp baseline: epoch" in line]
    assert trained and trained[-1].endswith("training the mlp baseline: epoch 2/2 (100%)"), lines
    assert lines.index(trained[0]) > next(i for i, line in enumerate(lines) if "loading the model and data" in line)
