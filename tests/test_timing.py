"""The measured speed-up as a ratio with an interval (`explorer.timing`), on simulated machines.

The machine is simulated by replacing timing's two clocks: each call advances the wall clock by
the duration the test chooses (and the thread's CPU clock by as much, or less when the test says
the process lost its core), so every test is deterministic and none races a real clock.
"""
from __future__ import annotations

import random
import statistics

import pytest
import torch
from scipy.stats import binom
from torch import nn

from explorer import jobs, measure, timing


class FakeMachine:
    """Clocks that move only when a simulated call runs: ``wall`` and ``cpu`` seconds."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def run(self, seconds: float, cpu_share: float = 1.0) -> None:
        self.wall += seconds
        self.cpu += seconds * cpu_share

    def install(self, monkeypatch) -> "FakeMachine":
        monkeypatch.setattr(timing, "_clock", lambda: self.wall)
        monkeypatch.setattr(timing, "_cpu_clock", lambda: self.cpu)
        return self


QUIET = timing.Load(cores=2, others_runnable=0, load1=0.1)
BUSY = timing.Load(cores=2, others_runnable=11, load1=12.0)


@pytest.mark.parametrize("n", [6, 7, 10, 20, 50, 101, 300])
def test_median_interval_ranks_match_the_binomial(n):
    values = list(range(1, n + 1))  # x_(k) == k
    median, low, high = timing.median_interval(values)
    assert median == statistics.median(values)
    j = int(low)
    assert high == n + 1 - j, "the interval is symmetric in ranks"
    assert 2 * binom.cdf(j - 1, n, 0.5) <= 0.05, "coverage at least 95 %"
    assert 2 * binom.cdf(j, n, 0.5) > 0.05, "and no wider than it needs to be"


def test_median_interval_below_six_values_is_the_whole_range():
    assert timing.median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, 1.0, 5.0)


def test_median_interval_covers_the_true_median_95_percent_of_the_time():
    rng = random.Random(0)
    true_median = 1.0  # lognormal(0, s) has median exp(0) = 1
    trials, covered = 2000, 0
    for _ in range(trials):
        _, low, high = timing.median_interval([rng.lognormvariate(0.0, 0.7) for _ in range(25)])
        covered += low <= true_median <= high
    assert covered / trials >= 0.94


def test_tight_needs_both_sides_within_tolerance():
    assert timing.tight(0.96, 1.0, 1.04, 0.05)
    assert not timing.tight(0.94, 1.0, 1.01, 0.05)
    assert not timing.tight(0.99, 1.0, 1.06, 0.05)


def test_quiet_machine_stops_early_with_a_tight_interval(monkeypatch):
    machine = FakeMachine().install(monkeypatch)
    rng = random.Random(1)
    calls = {"dense": lambda: machine.run(2e-3 * rng.uniform(0.99, 1.01)),
             "pruned": lambda: machine.run(1e-3 * rng.uniform(0.99, 1.01))}
    samples, reps = timing.time_alternating(calls, min_run_time=0.05, max_run_time=3.0)
    assert reps == 1  # a 1 ms call is its own sample
    assert samples.seconds < 0.2, "a tight interval stops the timing long before the cap"
    summary = timing.summarise(samples, load=QUIET)
    assert summary["speedup_measured"] == pytest.approx(2.0, rel=0.02)
    low, high = summary["speedup_interval"]
    assert low <= summary["speedup_measured"] <= high and timing.tight(low, summary["speedup_measured"], high, 0.05)
    assert not summary["noisy"] and summary["noise"] is None and summary["pairs_dropped"] == 0


def test_bimodal_busy_machine_keeps_1x_inside_the_interval(monkeypatch):
    """The issue's busy machine: each sample takes 0.40 ms or 2.44 ms, depending on the core it got.

    Block medians read anything from 0.07x to 604x there; the median of per-pair ratios stays at 1x.
    """
    machine = FakeMachine().install(monkeypatch)
    rng = random.Random(2)
    slow = lambda: (2.44e-3 if rng.random() < 0.3 else 0.40e-3) * rng.uniform(0.97, 1.03)  # noqa: E731
    calls = {"dense": lambda: machine.run(slow()), "pruned": lambda: machine.run(slow())}
    samples, _ = timing.time_alternating(calls, min_run_time=0.3, max_run_time=0.5)
    summary = timing.summarise(samples, load=BUSY)
    low, high = summary["speedup_interval"]
    assert low <= 1.0 <= high, "the truth (1x) stays inside the interval"
    assert summary["speedup_measured"] == pytest.approx(1.0, abs=0.05)
    block_medians = [statistics.median(samples.wall["dense"][i:i + 20]) / statistics.median(samples.wall["pruned"][i:i + 20])
                     for i in range(0, len(samples.wall["dense"]) - 20, 20)]
    assert max(block_medians) / min(block_medians) > 1.5, "the simulated machine really is bimodal"


def test_a_noisy_machine_is_flagged_and_never_shown_as_a_bare_figure(monkeypatch):
    machine = FakeMachine().install(monkeypatch)
    rng = random.Random(3)
    calls = {"dense": lambda: machine.run(1e-3 * rng.lognormvariate(0, 0.5)),
             "pruned": lambda: machine.run(1e-3 * rng.lognormvariate(0, 0.5))}
    samples, _ = timing.time_alternating(calls, min_run_time=0.05, max_run_time=0.5)
    assert samples.seconds == pytest.approx(0.5, abs=0.01), "the cap ends a timing that never tightens"
    summary = timing.summarise(samples, load=BUSY)
    low, high = summary["speedup_interval"]
    assert low <= 1.0 <= high
    assert summary["noisy"] and summary["noise"] == "the machine is busy (load 12.0 on 2 cores)"
    shown = timing.speedup_text({"speedup_measured": summary["speedup_measured"], "speedup_interval": [low, high],
                                 "speedup_noisy": True})
    assert shown == f"noisy: {low:.2f}-{high:.2f}x"


def test_samples_that_lost_their_core_are_dropped(monkeypatch):
    """Every third round the process is descheduled for 20 ms in the middle of the dense call."""
    machine = FakeMachine().install(monkeypatch)
    counter = {"dense": 0}

    def dense():
        counter["dense"] += 1
        if counter["dense"] % 3 == 0:
            machine.run(1e-3)
            machine.run(20e-3, cpu_share=0.0)  # waiting for a core: wall time passes, CPU time does not
        else:
            machine.run(1e-3)

    samples, _ = timing.time_alternating({"dense": dense, "pruned": lambda: machine.run(0.5e-3)},
                                         min_run_time=0.05, max_run_time=1.0)
    summary = timing.summarise(samples, load=QUIET)
    rounds = len(samples.wall["dense"])
    lost = sum(1 for wall, cpu in zip(samples.wall["dense"], samples.cpu["dense"]) if cpu < 0.8 * wall)
    assert lost > 0 and summary["pairs_dropped"] == lost and summary["pairs"] == rounds - lost
    assert summary["speedup_measured"] == pytest.approx(2.0, rel=1e-6), "the preempted calls left no trace"
    assert summary["dense"]["median_ms"] == pytest.approx(1.0, rel=1e-6)


def test_choose_threads_lowers_to_the_free_cores_but_keeps_what_was_asked():
    assert timing.choose_threads(None, 2, QUIET) == (2, "")
    threads, note = timing.choose_threads(None, 2, BUSY)
    assert (threads, note) == (1, "lowered from 2 to 1: 11 other task(s) wanted the 2 core(s) (load 12.0 on 2 cores)")
    threads, note = timing.choose_threads(4, 2, BUSY)
    assert threads == 4 and note == ("4 as asked, though only 1 core(s) were free (load 12.0 on 2 cores): "
                                     "threads may wait for each other")
    assert timing.choose_threads(None, 8, BUSY, cpu=False) == (8, "")


def test_machine_load_counts_other_runnable_tasks():
    load = timing.machine_load(samples=2, gap_s=0.0)
    assert load.cores >= 1 and load.others_runnable >= 0 and load.free_cores >= 1


def test_compare_latency_speedup_is_the_median_of_its_stored_pairs():
    """Independent check against the raw timings: recompute median and interval from ``pairs_ms``."""
    big = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))
    small = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    result = measure.compare_latency(big, small, torch.randn(32, 256), threads=1, min_run_time=0.05, max_run_time=0.5)
    ratios = [dense / pruned for dense, pruned in result["pairs_ms"]]
    assert len(ratios) == result["pairs"] >= timing.MIN_PAIRS
    assert result["speedup_measured"] == pytest.approx(statistics.median(ratios), rel=1e-4)
    _, low, high = timing.median_interval(ratios)
    assert result["speedup_interval"] == pytest.approx([low, high], rel=1e-4)
    assert result["dense"]["median_ms"] == pytest.approx(statistics.median(d for d, _ in result["pairs_ms"]), rel=1e-4)
    assert result["dense"]["threads"] == result["pruned"]["threads"] == 1
    assert result["load"]["cores"] >= 1 and result["seconds"] > 0


def test_timing_beside_a_job_of_this_app_is_flagged():
    release = jobs.threading.Event()
    job = jobs.start(lambda context: release.wait(30), name="Fine-tuning")
    try:
        model = nn.Linear(8, 8)
        result = measure.compare_latency(model, model, torch.randn(4, 8), min_run_time=0.01, max_run_time=0.05)
    finally:
        release.set()
        job.wait(30)
    assert result["noisy"] and "Fine-tuning ran in this app" in result["noise"]
    assert result["during_jobs"] == ["Fine-tuning"]
    assert jobs.running_elsewhere() == []


def test_a_job_does_not_flag_its_own_timing():
    def work(context):
        model = nn.Linear(8, 8)
        return measure.compare_latency(model, model, torch.randn(4, 8), min_run_time=0.01, max_run_time=0.05)

    job = jobs.start(work, name="Methods")
    assert job.wait(60) and job.error is None
    assert job.result["during_jobs"] == []


@pytest.mark.parametrize("metrics, text", [
    ({"speedup_measured": None}, "-"),
    ({"speedup_measured": 1.234}, "1.23x"),  # a run stored before intervals existed
    ({"speedup_measured": 1.0, "speedup_interval": [0.98, 1.03], "speedup_noisy": False}, "1.00x (0.98-1.03)"),
    ({"speedup_measured": 0.01, "speedup_interval": [0.40, 2.10], "speedup_noisy": True}, "noisy: 0.40-2.10x"),
])
def test_speedup_text(metrics, text):
    assert timing.speedup_text(metrics) == text


@pytest.mark.parametrize("metrics, card", [
    ({"speedup_measured": None}, ("-", None)),
    ({"speedup_measured": 1.234}, ("1.23x", None)),
    ({"speedup_measured": 1.0, "speedup_interval": [0.98, 1.03], "speedup_noisy": False}, ("1.00x", "95 %: 0.98-1.03x")),
    ({"speedup_measured": 0.01, "speedup_interval": [0.40, 2.10], "speedup_noisy": True}, ("noisy", "95 %: 0.40-2.10x")),
])
def test_speedup_card(metrics, card):
    assert timing.speedup_card(metrics) == card


def test_timing_note_names_the_reason_and_the_threads():
    note = timing.timing_note({"speedup_measured": 1.0, "speedup_interval": [0.4, 2.1], "speedup_noisy": True,
                               "speedup_noise": "the machine is busy (load 12.0 on 2 cores)",
                               "timing": {"pairs": 40, "seconds": 3.0, "threads_note": "lowered from 2 to 1: busy"}})
    assert "noisy: the machine is busy (load 12.0 on 2 cores); 95 % interval 0.40-2.10x from 40 pairs in 3.0 s" in note
    assert note.endswith("Measure again on a quieter machine. Thread count lowered from 2 to 1: busy.")
    assert timing.timing_note({"speedup_measured": 1.0, "speedup_interval": [0.99, 1.01],
                               "speedup_noisy": False, "timing": {}}) == ""
