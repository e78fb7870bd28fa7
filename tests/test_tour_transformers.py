"""The Tour on a transformer: its three questions answered in the model's own metric (perplexity here)."""
import math

import pytest

from explorer import pipeline, tasks, tour
from explorer.specs import PlanSpec, ScoringSpec
from tests.apptest import goto
from tests.test_app_transformers import load_transformer, start
from explorer.specs import DEFAULT_EVAL_TOKENS


def test_the_tour_runs_on_tiny_gpt2_in_perplexity(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))
    at = load_transformer(start(), "tiny_gpt2")
    goto(at, "app_pages/tour.py")
    assert not at.exception and not at.error
    for step in ("what", "decide", "time"):
        at.button(key=f"tour_{step}").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    current = at.session_state["current_model"]
    model, data = current["module"], current["dataset"]
    evidence = {key[0]: value for key, value in at.session_state["tour_evidence"].items()}
    base = tasks.perplexity(model, data, max_tokens=DEFAULT_EVAL_TOKENS)  # the default budget

    # q1: rows in perplexity, the table names it; the unstructured row is the same plan computed here
    what = evidence["what"]
    first = what["rows"][0]
    assert first["structure"] == "unstructured" and first["task"]["name"] == "perplexity"
    prepared = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude"), dataset=data)
    mine = pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(first["sparsity"], "local")))
    expected = tasks.perplexity(mine, data, max_tokens=DEFAULT_EVAL_TOKENS)
    assert first["task"]["pruned"] == pytest.approx(expected, rel=1e-4)
    assert first["task"]["base"] == pytest.approx(base, rel=1e-4)
    table = at.dataframe[0].value
    assert "perplexity" in table.columns and "accuracy" not in table.columns
    assert table["perplexity"].tolist() == pytest.approx([row["task"]["pruned"] for row in what["rows"]])

    # q2: magnitude's row == perplexity after the same global cut, computed here; dense perplexity is the base
    decide = evidence["decide"]
    assert decide["task"]["name"] == "perplexity" and decide["task"]["higher_is_better"] is False
    assert decide["task"]["base"] == pytest.approx(base, rel=1e-4)
    prepared = pipeline.prepare(model, ScoringSpec("unstructured", "magnitude", calib_batches=2), dataset=data)
    plan = pipeline.preview(prepared, PlanSpec(decide["sparsity"], "global"))
    expected = None if plan.collapsed else tasks.perplexity(pipeline.apply(model, prepared, plan), data,
                                                            max_tokens=DEFAULT_EVAL_TOKENS)
    assert decide["task"]["values"]["magnitude"] == pytest.approx(expected, rel=1e-4)
    shown = at.dataframe[1].value
    assert list(shown.columns) == ["criterion", "perplexity"]
    assert dict(zip(shown["criterion"], shown["perplexity"])).keys() == decide["task"]["values"].keys()

    # q3: one-shot vs gradual (the lab's pick for a transformer) at its budget, 50 %, 1 epoch, read lower-is-better
    over_time = evidence["time"]
    assert set(over_time) == {"one_shot", "gradual"} and all(r["metrics"] for r in over_time.values())
    single, stepped = (over_time[n]["metrics"]["task"]["pruned"] for n in ("one_shot", "gradual"))
    assert all(math.isfinite(v) and v > 0 for v in (single, stepped))
    assert all(r["metrics"]["task"]["name"] == "perplexity" for r in over_time.values())
    reading = [m.value for m in at.markdown if m.value.startswith("Here stepping")]
    assert reading == [tour.over_time_text(over_time, 1, 1, 0.5, current["task"])]
    assert reading[0].startswith("Here stepping helped" if stepped <= single else "Here stepping did not help")
    assert f"perplexity {stepped:,.2f} against perplexity {single:,.2f}" in reading[0]


def test_question_three_reads_a_transformers_metric_in_its_own_direction():
    ppl = {"name": "perplexity", "measure": "perplexity", "higher_is_better": False}
    runs = lambda a, b: {"one_shot": {"metrics": {"task": {"pruned": a}}},  # noqa: E731
                         "iterative, 6 rounds": {"metrics": {"task": {"pruned": b}}}}
    text = tour.over_time_text(runs(120.0, 80.5), 4, 2, 0.5, ppl)
    assert text.startswith("Here stepping helped: 2 cuts to 50% ends at perplexity 80.50 against perplexity 120.00 "
                           "for one cut (-39.50; lower is better), from the same 4-epoch budget")
    text = tour.over_time_text(runs(80.5, 120.0), 4, 2, 0.5, ppl)
    assert text.startswith("Here stepping did not help: 2 cuts to 50% ends at perplexity 120.00 against perplexity "
                           "80.50 for one cut (+39.50; lower is better). One cut had all 4 epochs to recover")
    top1 = {"name": "fidelity", "measure": "top1", "higher_is_better": True}
    gradual = {"one_shot": {"metrics": {"task": {"pruned": 0.5}}}, "gradual": {"metrics": {"task": {"pruned": 0.75}}}}
    assert tour.over_time_text(gradual, 1, 1, 0.5, top1).startswith(
        "Here stepping helped: raising the sparsity gradually while training to 50% ends at 75.0% top-1 agreement "
        "against 50.0% top-1 agreement for one cut (+25.0 points; higher is better)")
    cosine = {"name": "fidelity", "measure": "cosine", "higher_is_better": True}
    assert tour.over_time_text(runs(0.9, 0.8), 4, 2, 0.5, cosine).startswith(
        "Here stepping did not help: 2 cuts to 50% ends at cosine 0.800 against cosine 0.900 for one cut "
        "(-0.100; higher is better)")
    # accuracy (task None or accuracy) keeps its own reading
    acc = {"one_shot": {"metrics": {"accuracy": 0.9}}, "iterative": {"metrics": {"accuracy": 0.95}}}
    assert tour.over_time_text(acc, 3, 3, 0.9, {"name": "accuracy"}) == tour.over_time_text(acc, 3, 3, 0.9)
