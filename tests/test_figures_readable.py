"""Charts and words read cleanly (issue 21, item 4): short layer labels on a 37-layer transformer, round ticks,
log counts in powers of ten, a training curve's % axis at round values; 'an embedding', '1 full epoch',
'trained in' right after training."""
import types

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
    assert titles[0] == "attention.self.query (Linear 384x384)" and figure.layout.title.text == "Weights - hf.encoder.layer.0"
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
