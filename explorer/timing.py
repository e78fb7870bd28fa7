"""Measured speed-ups a user can trust: paired timings, a median ratio and its 95 % interval.

Dense and pruned models are timed sample by sample, alternating (dense, pruned, pruned, dense,
...), so whatever the machine does in a moment hits both alike; each pair gives one ratio, and
the speed-up is the median ratio with a distribution-free 95 % interval (order statistics of the
binomial, no normality assumed). Timing stops once the interval lies within ``tolerance`` of the
median, or when ``max_run_time`` has passed; an interval that stays wide is *noisy*, and says why.

Three things make CPU timing bimodal on a busy machine, and each has its counter here:
- several OpenMP threads, one descheduled, the others waiting for it at every barrier (a 0.4 ms
  forward took 500 ms on two threads beside ten CPU burners): time on no more threads than the
  machine has free cores (`choose_threads`);
- a sample during which the process lost its core: its thread CPU time falls short of its wall
  time, and the pair is dropped (counted in ``pairs_dropped``);
- a median over a few long blocks, where one preempted block moves the figure: many short
  samples instead.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

CONFIDENCE = 0.95
TOLERANCE = 0.05           # the interval is "tight" within +-5 % of the median
MAX_RUN_TIME_S = 3.0       # default cap on the time spent timing one pair of models
MIN_PAIRS = 10             # never stop before this many kept pairs (the 95 % interval needs >= 6)
MAX_PAIRS = 1000           # enough for a +-1 % interval on any sane distribution; bounds the stored timings
_clock = time.perf_counter       # wall clock; tests replace both clocks to simulate a machine
_cpu_clock = time.thread_time    # CPU time of this thread: short of the wall time when the core was lost
SAMPLE_S = 0.001           # one sample repeats the call until it lasts about this long
CPU_SHARE_MIN = 0.8        # thread CPU / wall below this: the process lost its core during the sample


@dataclass
class Load:
    """What else the machine was doing: usable cores, other runnable tasks now, 1-minute load average."""

    cores: int
    others_runnable: int
    load1: float

    @property
    def free_cores(self) -> int:
        return max(1, self.cores - self.others_runnable)

    @property
    def busy(self) -> bool:
        return self.others_runnable >= self.cores or self.load1 > self.cores

    def describe(self) -> str:
        return f"load {self.load1:.1f} on {self.cores} core{'s' * (self.cores != 1)}"

    def to_dict(self) -> dict:
        return {"cores": self.cores, "others_runnable": self.others_runnable, "load1": round(self.load1, 2)}


def machine_load(samples: int = 5, gap_s: float = 0.01) -> Load:
    """Usable cores and how many other tasks want them right now.

    The 1-minute load average lags by a minute; ``/proc/loadavg``'s fourth field counts the tasks
    runnable at this instant, this process's own threads included (an OpenMP worker still spinning
    after the last forward), so the least of a few samples, less this process's runnable threads, is
    how many others compete now. Elsewhere than Linux the load average stands in for it.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    runnable = []
    for index in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as handle:
                total = int(handle.read().split()[3].split("/")[0])
            runnable.append(total - max(1, _own_runnable_threads()))
        except (OSError, ValueError, IndexError):
            break
        if index + 1 < samples:
            time.sleep(gap_s)
    others = max(0, min(runnable)) if runnable else max(0, round(load1) - 1)
    return Load(cores=cores, others_runnable=others, load1=load1)


def _own_runnable_threads() -> int:
    """This process's threads that are runnable now (an OpenMP worker still spinning counts): not "others"."""
    count = 0
    for task in os.scandir("/proc/self/task"):
        try:
            with open(os.path.join(task.path, "stat"), encoding="ascii") as handle:
                count += handle.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return count


def choose_threads(requested: int | None, default: int, load: Load, *, cpu: bool = True) -> tuple[int, str]:
    """Threads to time with, and a note when they differ from what the user would expect.

    A number the user asked for is kept (with a warning when it exceeds the free cores); otherwise
    torch's setting, lowered to the free cores on the CPU, since threads that outnumber the cores
    wait for each other and the timing becomes a lottery.
    """
    if requested:
        note = (f"{requested} as asked, though only {load.free_cores} core(s) were free ({load.describe()}): "
                "threads may wait for each other" if cpu and requested > load.free_cores else "")
        return int(requested), note
    if not cpu or default <= load.free_cores:
        return int(default), ""
    return load.free_cores, (f"lowered from {default} to {load.free_cores}: {load.others_runnable} other task(s) "
                             f"wanted the {load.cores} core(s) ({load.describe()})")


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Median of ``values`` and a distribution-free ``confidence`` interval for it.

    The interval is ``[x_(j), x_(n+1-j)]`` of the sorted values, with the largest ``j`` such that
    ``P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2``: whatever the distribution, the true median
    lies outside with probability at most ``1 - confidence``. Below 6 values no such ``j`` exists
    for 95 %, and the interval is the whole range (reported as such, and noisy).
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    median = statistics.median(ordered)
    alpha = (1 - confidence) / 2
    j = _lower_rank(n, alpha)
    if j == 0:
        return median, ordered[0], ordered[-1]
    return median, ordered[j - 1], ordered[n - j]


def _lower_rank(n: int, alpha: float) -> int:
    """Largest j with P(Binomial(n, 1/2) <= j - 1) <= alpha (0 when even j = 1 fails)."""
    if n > 300:  # normal approximation, exact to a rank or so at this size
        return max(0, int(math.floor(n / 2 - _z(alpha) * math.sqrt(n) / 2)))
    cumulative, j = 0.0, 0
    for k in range(n + 1):
        cumulative += math.comb(n, k) / 2 ** n
        if cumulative > alpha:
            break
        j = k + 1
    return j


def _z(alpha: float) -> float:
    return statistics.NormalDist().inv_cdf(1 - alpha)


def tight(low: float, middle: float, high: float, tolerance: float) -> bool:
    """Whether the interval lies within ``tolerance`` (relative) of its middle on both sides."""
    return middle > 0 and high <= middle * (1 + tolerance) and low >= middle * (1 - tolerance)


@dataclass
class Samples:
    """Per-sample wall and thread-CPU seconds (one call's worth each) of every timed model."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def time_alternating(calls: dict[str, Callable[[], None]], *, sync: Callable[[], None] = lambda: None,
                     min_run_time: float, max_run_time: float, tolerance: float = TOLERANCE,
                     check_cpu: bool = True) -> tuple[Samples, int]:
    """Time each of ``calls`` sample by sample, in alternating order, until the result is tight.

    With two calls the stopping rule reads the speed-up's interval; with one, the latency's.
    Returns the raw samples and how many repetitions of the call one sample holds.
    """
    labels = list(calls)
    reps = _repetitions(calls, sync)
    samples = Samples(wall={label: [] for label in labels}, cpu={label: [] for label in labels})
    start = _clock()
    rounds, next_check = 0, MIN_PAIRS
    while True:
        for label in (labels if rounds % 2 == 0 else labels[::-1]):
            call = calls[label]
            cpu0, wall0 = _cpu_clock(), _clock()
            for _ in range(reps):
                call()
            sync()
            wall1, cpu1 = _clock(), _cpu_clock()
            samples.wall[label].append((wall1 - wall0) / reps)
            samples.cpu[label].append((cpu1 - cpu0) / reps)
        rounds += 1
        elapsed = _clock() - start
        if rounds >= MAX_PAIRS or (elapsed >= max_run_time and rounds >= MIN_PAIRS):
            break
        if rounds >= next_check and elapsed >= min_run_time:
            next_check = rounds + max(4, rounds // 8)
            if tight(*_interval_of(samples, labels, check_cpu), tolerance):
                break
    samples.seconds = _clock() - start
    return samples, reps


def summarise(samples: Samples, *, load: Load, busy_jobs: list[str] = (), tolerance: float = TOLERANCE,
              check_cpu: bool = True) -> dict:
    """What the samples say: each model's latency and, with two models, the speed-up with its interval.

    Per model (keyed by its label): ``median_ms`` over the samples kept (none of the round's models
    lost its core), its 95 % ``interval_ms``, ``low_ms`` (10th percentile, the uncontended estimate),
    ``iqr_ms`` and ``samples``. With two models (dense first), ``speedup_measured`` is the median of
    the per-round ratios dense / pruned, ``speedup_interval`` its interval, ``pairs_ms`` the kept raw
    pairs. ``noisy`` when the interval (of the speed-up, or of the one latency) is wider than
    ``tolerance`` or a job of this app ran beside the timing; ``noise`` says why.
    """
    labels = list(samples.wall)
    rounds = len(samples.wall[labels[0]])
    kept = kept_pairs(samples, labels, check_cpu)
    dropped = rounds - len(kept)
    if len(kept) < MIN_PAIRS:  # (nearly) every sample lost its core: keep them all, and say so below
        kept = list(range(rounds))
    result: dict = {label: _latency_summary([samples.wall[label][i] for i in kept]) for label in labels}
    if len(labels) == 2:
        first, second = labels
        middle, low, high = median_interval(_measured(samples, labels, kept))
        result.update(speedup_measured=middle, speedup_interval=[low, high],
                      pairs_ms=[[_ms(samples.wall[first][i]), _ms(samples.wall[second][i])] for i in kept])
    else:
        middle, (low, high) = result[labels[0]]["median_ms"], result[labels[0]]["interval_ms"]
    reasons = []
    if busy_jobs:
        reasons.append(f"timed while {', '.join(busy_jobs)} ran in this app")
    if load.busy:
        reasons.append(f"the machine is busy ({load.describe()})")
    if dropped > 0.2 * rounds:
        reasons.append(f"{dropped} of {rounds} samples lost their core")
    noisy = bool(busy_jobs) or not tight(low, middle, high, tolerance)
    if noisy and not reasons:
        reasons.append(f"the timings vary more than +-{tolerance:.0%}")
    result.update(noisy=noisy, noise="; ".join(reasons) if noisy else None, pairs=len(kept),
                  pairs_dropped=dropped, seconds=round(samples.seconds, 3), load=load.to_dict(),
                  during_jobs=list(busy_jobs))
    return result


def _ms(seconds: float) -> float:
    """Milliseconds to 6 significant digits: raw pairs stay exact to 1e-6 and small in the store."""
    return float(f"{seconds * 1e3:.6g}")


def _latency_summary(times_s: list[float]) -> dict:
    times_ms = sorted(t * 1e3 for t in times_s)
    if len(times_ms) >= 2:
        quartiles = statistics.quantiles(times_ms, n=4)
        iqr = quartiles[2] - quartiles[0]
        low = statistics.quantiles(times_ms, n=10)[0]
    else:
        iqr, low = 0.0, times_ms[0]
    median, interval_low, interval_high = median_interval(times_ms)
    return {"median_ms": median, "interval_ms": [interval_low, interval_high], "low_ms": low, "iqr_ms": iqr,
            "samples": len(times_ms)}


def kept_pairs(samples: Samples, labels: list[str], check_cpu: bool) -> list[int]:
    """Indices of the rounds in which no model lost its core (all of them when that cannot be told)."""
    rounds = range(len(samples.wall[labels[0]]))
    if not check_cpu:
        return list(rounds)
    return [i for i in rounds
            if all(samples.cpu[label][i] >= CPU_SHARE_MIN * samples.wall[label][i] for label in labels)]


def _interval_of(samples: Samples, labels: list[str], check_cpu: bool) -> tuple[float, float, float]:
    kept = kept_pairs(samples, labels, check_cpu)
    if len(kept) < MIN_PAIRS:
        return 0.0, 1.0, math.inf
    median, low, high = median_interval(_measured(samples, labels, kept))
    return low, median, high


def _measured(samples: Samples, labels: list[str], kept: list[int]) -> list[float]:
    """What the interval is of: the kept rounds' ratios first / second with two models, else the one's wall times."""
    if len(labels) == 1:
        return [samples.wall[labels[0]][i] for i in kept]
    return [samples.wall[labels[0]][i] / samples.wall[labels[1]][i] for i in kept]


def _repetitions(calls: dict[str, Callable[[], None]], sync: Callable[[], None]) -> int:
    """Calls per sample so that the fastest model's sample lasts about `SAMPLE_S` (1 for slow models)."""
    fastest = math.inf
    for call in calls.values():
        start = _clock()
        call()
        sync()
        fastest = min(fastest, _clock() - start)
    return max(1, min(1000, int(SAMPLE_S / max(fastest, 1e-7))))


def speedup_card(metrics: dict) -> tuple[str, str | None]:
    """A measured speed-up split for a metric card: the value ("1.01x", or "noisy") and its interval line.

    The same reading as `speedup_text`, short enough for a card: the interval goes under the value.
    """
    value, interval = metrics.get("speedup_measured"), metrics.get("speedup_interval")
    if value is None:
        return "-", None
    if not interval:
        return f"{value:.2f}x", None
    return ("noisy" if metrics.get("speedup_noisy") else f"{value:.2f}x"), f"95 %: {interval[0]:.2f}-{interval[1]:.2f}x"


def speedup_text(metrics: dict) -> str:
    """A measured speed-up as a user should read it: the median with its 95 % interval, or "noisy".

    ``metrics`` holds ``speedup_measured`` and, for runs measured since intervals exist,
    ``speedup_interval`` and ``speedup_noisy``. A noisy figure shows only its interval: a point
    value drawn from a wide interval would read as a finding.
    """
    value = metrics.get("speedup_measured")
    if value is None:
        return "-"
    interval = metrics.get("speedup_interval")
    if not interval:
        return f"{value:.2f}x"
    low, high = interval
    if metrics.get("speedup_noisy"):
        return f"noisy: {low:.2f}-{high:.2f}x"
    return f"{value:.2f}x ({low:.2f}-{high:.2f})"


def timing_note(metrics: dict) -> str:
    """One line on how far a measured speed-up can be trusted: why it is noisy, and the threads used.

    Empty for a tight figure timed on the threads the user expected; old runs without timing
    details give an empty line too.
    """
    details = metrics.get("timing") or {}
    parts = []
    if metrics.get("speedup_noisy") and metrics.get("speedup_interval"):
        low, high = metrics["speedup_interval"]
        parts.append(f"Measured speed-up is noisy: {metrics.get('speedup_noise') or 'the timings vary'}; "
                     f"95 % interval {low:.2f}-{high:.2f}x from {details.get('pairs', '?')} pairs in "
                     f"{details.get('seconds') or 0:.1f} s. Measure again on a quieter machine.")
    if details.get("threads_note"):
        parts.append(f"Thread count {details['threads_note']}.")
    return " ".join(parts)
