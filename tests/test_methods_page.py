"""The Methods page through AppTest: methods run side by side in the background, are saved and compared."""
import pytest
from streamlit.testing.v1 import AppTest

from explorer.store import RunStore
from tests.apptest import goto, wait_for_job


def open_methods() -> AppTest:
    return goto(AppTest.from_file("../app.py", default_timeout=120).run(), "app_pages/methods.py")


def wait_for_lab(at: AppTest, timeout: float = 120):
    return wait_for_job(at, "methods_job", timeout, "methods")


def test_methods_run_side_by_side_and_become_runs():
    at = open_methods()
    assert any(e.label == "What am I looking at?" for e in at.expander)
    at.number_input(key="methods_epochs").set_value(1)
    at.slider(key="methods_sparsity").set_value(0.7)
    at.multiselect(key="methods_chosen").set_value(["one_shot", "penalty"])
    at.button(key="methods_start").click().run()
    job = wait_for_lab(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    result, penalty = job.result
    assert result.method == "one_shot" and result.error is None and not result.cancelled
    assert [p["event"] for p in result.trajectory] == ["prune", "epoch"]
    for finished in (result, penalty):
        assert finished.metrics["sparsity_actual"] == pytest.approx(0.7, abs=1e-4)
    table = at.dataframe[0].value
    assert table["method"].tolist() == ["one_shot", "penalty"]
    assert any(chart.proto.id and "methods_norms" in chart.proto.id for chart in at.get("plotly_chart"))
    stored = RunStore().get(result.run_id)
    assert stored.trajectory == result.trajectory and stored.recipe["method"] == {"name": "one_shot"}
    assert stored.recipe["budget"] == {"epochs": 1, "view": "counted", "start_epochs": 30}  # the zoo MLP's training
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception and not at.error
    assert "Trajectories of methods over time" in [h.value for h in at.subheader]
    picked = at.multiselect(key="cmp_traj").value  # the newest four of the model's runs with a trajectory
    assert picked[-2:] == [result.run_id, penalty.run_id] and len(picked) <= 4


def test_cancel_keeps_what_ran_and_runs_nothing_after():
    at = open_methods()
    at.number_input(key="methods_epochs").set_value(3)
    at.button(key="methods_start").click().run()
    job = at.session_state["methods_job"]
    job.cancel.set()
    wait_for_lab(at)
    assert not at.exception
    assert job.cancelled
    assert all(r.cancelled or r.error for r in job.result)  # whatever had started stopped early
    assert len(job.result) <= 1


def test_a_method_that_cannot_serve_the_structure_is_one_line_and_nothing_runs():
    at = open_methods()
    at.selectbox(key="methods_structure").set_value("channel")
    at.multiselect(key="methods_chosen").set_value(["one_shot", "set"])
    at.button(key="methods_start").click().run()
    assert not at.exception
    assert "set cannot prune with channel structure" in "\n".join(e.value for e in at.error)
    assert "methods_job" not in at.session_state


def test_every_method_runs_from_the_page_under_one_budget():
    from explorer.methods import METHODS

    at = open_methods()
    at.number_input(key="methods_epochs").set_value(3)
    at.slider(key="methods_sparsity").set_value(0.8)
    at.multiselect(key="methods_chosen").set_value(list(METHODS))
    at.selectbox(key="methods_batch").set_value(256)
    at.number_input(key="methods_start_epochs").set_value(0)  # every method 3 epochs, the start model's not counted
    at.button(key="methods_start").click().run()
    job = wait_for_lab(at, timeout=400)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [r.method for r in job.result] == list(METHODS)
    for result in job.result:
        assert result.error is None and result.metrics is not None, result.method
        assert result.metrics["sparsity_actual"] == pytest.approx(0.8, abs=0.02), result.method
        assert max(p["epoch"] for p in result.trajectory) <= 3, result.method  # the budget holds
    assert at.dataframe[0].value["method"].tolist() == list(METHODS)
    # a method whose test accuracy sits within 1.5 x chance (1/10 classes) is called out, the others are not
    at_chance = [r.method for r in job.result if r.metrics["accuracy"] <= 0.15]
    warned = [w.value.split(" ended at chance")[0] for w in at.warning if " ended at chance" in str(w.value)]
    assert warned == at_chance


def test_the_fresh_budget_view_and_the_claims_it_checks_are_computed_from_the_runs():
    from explorer.methods.lab import claims

    at = open_methods()
    assert at.multiselect(key="methods_chosen").value[:2] == ["iterative", "one_shot"]  # the claims' entries
    at.radio(key="methods_view").set_value("fresh")
    at.number_input(key="methods_epochs").set_value(2)
    at.slider(key="methods_sparsity").set_value(0.5)
    at.multiselect(key="methods_chosen").set_value(["lr_rewinding", "one_shot, fine-tune at lr/10 constant"])
    at.button(key="methods_start").click().run()
    job = wait_for_lab(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    for result in job.result:  # one dense epoch from fresh weights, then the cut and one more
        epochs = [p for p in result.trajectory if p["event"] == "epoch"]
        assert [(p["epoch"], p["sparsity"] == 0) for p in epochs] == [(1, True), (2, False)], result.method
    assert any("Same budget from fresh weights: every method trained 2 epochs in all" in c.value for c in at.caption)
    (row,) = claims({r.method: r.metrics["accuracy"] for r in job.result})
    shown = [m.value for m in at.markdown if "LR rewinding >= fine-tuning" in m.value]
    assert shown == [f"- {'✅' if row['holds'] else '❌'} {row['claim']} ({row['source']}): {row['verdict']}."]
    accuracies = [f"{r.metrics['accuracy']:.1%}" for r in job.result]
    assert all(value in shown[0] for value in accuracies)
