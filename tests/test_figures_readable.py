"""Charts and words read cleanly (issue 21, item 4): short layer labels on a 37-layer transformer, round ticks,
log counts in powers of ten, a training curve's % axis at round values; 'an embedding', '1 full epoch',
'trained in' right after training."""
import types

import pytest

from explorer import figures


MINILM_LIKE = [f"hf.encoder.layer.{block}.{role}" for block in range(6) for role in
               ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")] + ["hf.pooler.dense"]


def test_many_layer_names_lose_their_shared_prefix_and_slant():
    ticks = figures.layer_ticks(MINILM_LIKE[:36])
    assert ticks["ticktext"][0] == "0.attention.self.query" and ticks["ticktext"][-1] == "5.output.dense"
    assert ticks["tickvals"] == MINILM_LIKE[:36] and ticks["tickangle"] == -60 and ticks["automargin"]
    mixed = figures.layer_ticks(MINILM_LIKE)  # the pooler shares only 'hf.'
    assert mixed["ticktext"][-1] == "pooler.dense" and mixed["ticktext"][0] == "encoder.layer.0.attention.self.query"
    assert figures.layer_ticks(["fc1", "fc2", "classifier"])["ticktext"] == ["fc1", "fc2", "classifier"]
    assert "tickangle" not in figures.layer_ticks(["fc1", "fc2"])


def test_histogram_titles_are_short_and_log_counts_tick_at_powers_of_ten():
    summary = {"kind": "Linear", "shape": [384, 384], "hist": {"edges": [0.0, 1.0, 2.0], "counts": [3, 500]}}
    names = MINILM_LIKE[:6]
    figure = figures.histograms({n: summary for n in names}, names, "Weights", log_count=True)
    titles = [a.text for a in figure.layout.annotations]
    assert titles[0] == "attention.self.query<br>Linear 384x384" and figure.layout.title.text == "Weights - hf.encoder.layer.0"
    assert all(axis.dtick == 1 and axis.type == "log" for axis in (figure.layout.yaxis, figure.layout.yaxis6))


def test_the_training_curves_percent_axis_ticks_at_round_values():
    figure = figures.training_curve([(1, 2.0), (2, 1.0)], [(2, 0.9)], metric="accuracy", percent=True)
    axis = figure.layout.yaxis2
    assert (axis.tickmode, axis.tick0, axis.dtick, axis.tickformat) == ("linear", 0, 0.2, ".0%")


def test_the_gradient_axis_uses_powers_of_ten():
    weights = {"fc1": {"mean_abs": 0.1, "std": 0.2}, "fc2": {"mean_abs": 0.05, "std": 0.1}}
    figure = figures.layer_summary(weights, {"fc1": {"mean_abs": 1.7e-5}, "fc2": {"mean_abs": 1.06e-3}})
    assert figure.layout.yaxis2.exponentformat == "power" and figure.layout.yaxis2.tickmode == "auto"


def test_the_origin_of_an_embedding_model_reads_an_embedding():
    from app_pages.common import transformer_origin

    assert ", an embedding transformer," in transformer_origin("minilm", types.SimpleNamespace(task="embedding"))
    assert ", a causal lm transformer," in transformer_origin("tiny_gpt2", types.SimpleNamespace(task="causal_lm"))


def test_an_accuracy_axis_keeps_tenths_apart_on_a_narrow_range():
    assert figures._metric_axis("accuracy")["tickformat"] == ".1~%"  # 98.5% and 99.5%, not "99% 99%"
    assert figures._metric_axis("perplexity")["tickformat"] is None


def _figures_with_titles():
    """One of each chart the pages draw with a title, a legend above the plot or subplot titles."""
    import torch

    from explorer import planner, stats

    plan = planner.plan(planner.prepare({name: torch.rand(20) for name in MINILM_LIKE}), 0.5, "global")
    summaries = stats.summaries({name: ("Linear", torch.randn(30, 40)) for name in MINILM_LIKE[:6]})
    weights = {"fc1": {"mean_abs": 0.1, "std": 0.2}, "fc2": {"mean_abs": 0.05, "std": 0.1}}
    return {"plan (37 layers)": figures.plan_sparsity(plan, title="Per-layer sparsity (unstructured, magnitude, "
                                                                  "global); red = emptied"),
            "plan (3 layers)": figures.plan_sparsity(planner.plan(planner.prepare(
                {"a": torch.rand(4), "b": torch.rand(4), "c": torch.rand(4)}), 0.5, "local")),
            "histograms": figures.histograms(summaries, MINILM_LIKE[:6], "Weight distributions - base model"),
            "summary": figures.layer_summary(weights, {"fc1": {"mean_abs": 1e-5}, "fc2": {"mean_abs": 1e-3}}),
            "attribution": figures.attribution([0.1, 0.2], "fc1")}


def test_every_chart_title_starts_below_the_toolbar_and_fits_its_top_margin():
    """The toolbar (plotly's modebar, ~25 px at the top right) once sat on the titles: a centred title in a narrow
    window ran under it. Titles now start below its strip, left-aligned, wrapped, with the margin to hold them."""
    for name, figure in _figures_with_titles().items():
        title = figure.layout.title
        lines = title.text.count("<br>") + 1
        assert (title.yref, title.yanchor) == ("container", "top"), name
        assert (1 - title.y) * figure.layout.height == pytest.approx(figures.TOOLBAR_PX), name  # below the strip
        assert title.xanchor == "left" and title.x == 0, name
        assert all(len(line) <= figures.TITLE_WRAP + 2 for line in title.text.split("<br>")), name
        assert figure.layout.margin.t >= figures.TOOLBAR_PX + lines * figures.TITLE_LINE_PX, name
    subplots = _figures_with_titles()["histograms"]  # two-line subplot titles above the first row: more room
    assert subplots.layout.margin.t >= figures.TOOLBAR_PX + figures.TITLE_LINE_PX + 2 * figures.SUBPLOT_TITLE_LINE_PX
    legend = _figures_with_titles()["summary"]  # a legend above the plot: below the title, clear of the toolbar
    assert legend.layout.margin.t >= figures.TOOLBAR_PX + figures.TITLE_LINE_PX + figures.LEGEND_ABOVE_PX


def test_a_long_title_wraps_at_its_separators():
    assert figures.wrapped_title("Per-layer sparsity (unstructured, magnitude, global); red = emptied") == \
        "Per-layer sparsity (unstructured, magnitude, global);<br>red = emptied"
    assert figures.wrapped_title("Short title") == "Short title"


def test_a_37_layer_plan_lies_on_its_side_with_whole_level_names():
    """Slanted, 37 names overlapped one another in an 820 px window; on its side each has its own row."""
    figure = _figures_with_titles()["plan (37 layers)"]
    bar = figure.data[0]
    assert bar.orientation == "h" and list(bar.y) == MINILM_LIKE and len(bar.x) == 37
    assert figure.layout.yaxis.autorange == "reversed" and figure.layout.yaxis.tickangle is None
    assert list(figure.layout.yaxis.ticktext)[-1] == "pooler.dense"
    assert figure.layout.height >= 17 * 37 and figure.layout.shapes[0].x0 == 0.5
    small = _figures_with_titles()["plan (3 layers)"].data[0]
    assert small.orientation is None and list(small.x) == ["a", "b", "c"]  # a few layers: bars stand


def test_one_outlier_weight_no_longer_squashes_its_histogram_and_is_counted():
    """MiniLM's output.dense: weights within about ±0.3 and one at 6 gave an x axis to 6 and one visible bar."""
    import torch

    from explorer import stats

    torch.manual_seed(0)
    weights = torch.randn(384, 1536) * 0.05
    weights[7, 11], weights[3, 5] = 6.0, -2.5
    summary = stats.summarize(weights, bins=40)
    edges, counts = summary["hist"]["edges"], summary["hist"]["counts"]
    bulk = torch.sort(weights.reshape(-1)).values
    assert edges[-1] < 0.5 and edges[0] > -0.5  # about the bulk's 0.1 %-99.9 % range, a quarter wider
    outside = int(((weights < edges[0]) | (weights > edges[-1])).sum())
    assert summary["clipped"]["below"] + summary["clipped"]["above"] == outside >= 2
    assert sum(counts) == weights.numel() - outside and max(counts) < 0.2 * weights.numel()
    assert bulk[0] == -2.5 and summary["min"] == -2.5 and summary["max"] == 6.0  # the summary keeps the extremes
    figure = figures.histograms({"output.dense": {"kind": "Linear", "shape": [384, 1536], **summary}},
                                ["output.dense"], "Weights")
    assert figure.layout.annotations[0].text.endswith(f"<br>{outside} off axis (to -2.5 and 6)")
    plain = stats.summarize(torch.randn(20000))  # no outlier: the histogram spans min to max, nothing clipped
    assert plain["hist"]["edges"][0] == plain["min"] and plain["clipped"] == {"below": 0, "above": 0}
    tail = torch.cat([torch.randn(20000) * 0.05, torch.linspace(0.2, 0.4, 30)])  # a long tail, no outlier: kept
    assert stats.summarize(tail)["clipped"] == {"below": 0, "above": 0}


def test_the_titles_of_half_width_charts_fit_a_narrow_window():
    """Compare draws two charts side by side: at 820 px each is ~230 px wide, about 30 characters of title
    ('Measured vs theoretical (FLOPs) speed-up' was cut at 'speed-up')."""
    from tests.test_figures import interval_runs

    table = figures.runs_frame(interval_runs())
    for figure in (figures.speedup_promise(table), figures.accuracy_vs_sparsity(table)):
        assert len(figure.layout.title.text) <= 30, figure.layout.title.text
