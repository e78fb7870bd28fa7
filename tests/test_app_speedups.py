"""Every measured speed-up a page shows, checked against the raw timings it came from.

A measured speed-up is the median of per-pair ratios (dense / pruned, timed alternately) with a
95 % interval (`explorer.timing`). Each page that shows one is driven by AppTest, and the figure on
screen is recomputed here from the raw pairs the run keeps (``metrics["timing"]["pairs_ms"]``), with
the interval's ranks taken from scipy's binomial, not from the code under test.
"""
import re
import statistics

import pytest
from scipy.stats import binom
from streamlit.testing.v1 import AppTest

from explorer.store import RunStore
from tests.apptest import goto, set_sparsity, texts


def independent(pairs_ms: list[list[float]]) -> tuple[float, float, float]:
    """Median ratio and its distribution-free 95 % interval, from the raw pairs alone."""
    ratios = sorted(dense / pruned for dense, pruned in pairs_ms)
    n = len(ratios)
    j = max(k for k in range(0, n // 2 + 1) if k == 0 or 2 * binom.cdf(k - 1, n, 0.5) <= 0.05)
    low, high = (ratios[0], ratios[-1]) if j == 0 else (ratios[j - 1], ratios[n - j])
    return statistics.median(ratios), low, high


def expected_text(pairs_ms: list[list[float]]) -> tuple[str, bool]:
    median, low, high = independent(pairs_ms)
    noisy = not (low >= 0.95 * median and high <= 1.05 * median)
    return (f"noisy: {low:.2f}-{high:.2f}x" if noisy else f"{median:.2f}x ({low:.2f}-{high:.2f})"), noisy


def same_figures(shown: str, expected: str) -> bool:
    """Equal texts up to the last printed digit: the stored pairs keep 6 significant digits, so a ratio
    recomputed from them may land on the other side of a rounding boundary (1.785 vs 1.7849)."""
    numbers = re.compile(r"\d+\.\d+")
    if numbers.sub("#", shown) != numbers.sub("#", expected):
        return False
    return all(abs(float(a) - float(b)) <= 0.011 for a, b in zip(numbers.findall(shown), numbers.findall(expected)))


def start() -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=240).run()
    assert not at.exception, at.exception
    return at


def test_prune_card_and_compare_table_show_the_stored_pairs_median_and_interval():
    at = goto(start(), "app_pages/prune.py")
    set_sparsity(at, 0.8)
    at.button(key="prune_apply").click().run()
    assert not at.exception and not at.error, texts(at.error)
    run_id = at.session_state["pruned_result"]["run_id"]
    stored = RunStore().get(run_id).metrics
    pairs = stored["timing"]["pairs_ms"]
    assert len(pairs) == stored["timing"]["pairs"] >= 10
    text, noisy = expected_text(pairs)
    median, low, high = independent(pairs)
    cards = {m.label: m for m in at.metric}
    assert same_figures(cards["Speed-up, measured"].value, "noisy" if noisy else f"{median:.2f}x")
    assert same_figures(cards["Speed-up, measured"].delta, f"95 %: {low:.2f}-{high:.2f}x")
    assert stored["speedup_noisy"] == noisy
    assert f"batch 64, {stored['threads']} thread(s)" in texts(at.caption)
    if noisy:  # the page says why, next to the number
        assert any(same_figures(found, f"95 % interval {low:.2f}-{high:.2f}x")
                   for found in re.findall(r"95 % interval [\d.]+-[\d.]+x", texts(at.caption)))

    goto(at, "app_pages/compare.py")
    row = at.dataframe[0].value.set_index("id").loc[run_id]
    assert row["speed-up measured"] == pytest.approx(median, rel=1e-4)
    assert (row["measured 95 % low"], row["measured 95 % high"]) == pytest.approx((low, high), rel=1e-4)
    assert bool(row["noisy"]) == noisy
    chart = at.get("plotly_chart")[1].proto.spec
    assert "error_y" in chart and '"circle-open"' in chart or not noisy
    caption = texts(at.caption)
    assert "Unstructured runs shown: medians" in caption


def test_tour_table_shows_each_pruning_s_interval():
    at = goto(start(), "app_pages/tour.py")
    at.button(key="tour_what").click().run()
    assert not at.exception and not at.error, texts(at.error)
    rows = next(iter(at.session_state["tour_evidence"].values()))["rows"]
    table = at.dataframe[0].value
    column = "speedup_measured"
    assert len(rows) == 2
    for row, shown in zip(rows, table[column].tolist()):
        text, noisy = expected_text(row["timing"]["pairs_ms"])
        assert same_figures(shown, text) and row["speedup_noisy"] == noisy


def test_compare_shows_the_metric_and_the_speed_ups_first_and_the_technical_columns_apart(tmp_path, monkeypatch):
    """The table once needed horizontal scrolling to reach accuracy and the speed-ups (23 columns in stored order)."""
    import json

    from explorer.store import Run, RunStore

    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))
    RunStore().save(Run(model_name="mlp", dataset="digits", structure="channel", criterion="magnitude", scope="local",
                        sparsity=0.5, metrics={"accuracy": 0.9, "base_accuracy": 0.95, "delta_accuracy": -0.05,
                                               "speedup_measured": 1.5, "speedup_flops": 2.0,
                                               "size_compressed_bytes": 1000}))
    at = AppTest.from_file("../app_pages/compare.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    main, everything = at.dataframe[0].proto, at.dataframe[1].proto
    order = list(main.column_order)
    assert order[:6] == ["name", "sparsity", "accuracy", "Δ accuracy (pts)", "speed-up measured", "noisy"]
    assert len(order) <= 10 and "device" not in order and "measured 95 % low" not in order
    assert not list(everything.column_order)  # the expander's table: every column
    headers = {name: column.get("label") for name, column in json.loads(main.columns).items()}
    assert headers["speed-up measured"] == "measured x" and headers["speed-up FLOPs"] == "FLOPs x"
    assert max(len(label) for label in headers.values() if label) <= 14  # short headers
    name = json.loads(main.columns)["name"]
    assert name.get("width") == "medium" and name.get("pinned")  # a long name no longer pushes the numbers away
