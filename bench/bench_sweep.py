"""One 8-point grid three ways: one after the other in this process, a local process pool, a local Ray instance.

The grid (lenet5 on digits, criteria magnitude / taylor x sparsities 0.5 / 0.8 x seeds 0 / 1, 15
fine-tune epochs so that a point costs seconds, latency off) runs as ``python -m explorer sweep``
would, each point with one torch thread; the baselines of both seeds are trained and cached first,
so every backend pays the same. Each backend's wall time includes starting its workers (the pool's
fresh processes, Ray's instance). Every point's numbers must agree across the three backends
(checked, and written below).

Run from the repository root: ``python -m bench.bench_sweep [--workers 2] [--epochs 15]``; writes
``bench/RESULTS_sweep.md``. A pool or Ray pays a few seconds to start its workers (each imports torch),
so it only wins when a point costs more than that: ``--epochs 150`` makes a point cost several seconds.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import cpu_model
from explorer.store import RunStore
from explorer.sweep import _warm_baselines, expand, run_sweep

GRID = {"model": {"source": "lenet5", "data": "digits"}, "measure": {"latency": False}, "finetune": {"epochs": 15},
        "grid": {"criterion": ["magnitude", "taylor"], "sparsity": [0.5, 0.8], "seed": [0, 1]}}
EXACT = ("accuracy", "sparsity_actual", "params_nonzero", "flops_effective", "size_compressed_bytes")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15, help="fine-tune epochs of every point")
    args = parser.parse_args()
    GRID["finetune"] = {"epochs": args.epochs}
    os.environ.setdefault("PRUNING_EXPLORER_DATA", tempfile.mkdtemp())
    _, points = expand(GRID)
    _warm_baselines(points, threads=1)
    rows, numbers, loads = [], {}, []
    for label, backend, workers in (("sequential (this process)", "local", 1),
                                    (f"local pool, {args.workers} processes", "local", args.workers),
                                    (f"local Ray instance, {args.workers} CPUs", "ray", args.workers)):
        loads.append(os.getloadavg()[0])
        started = time.perf_counter()
        sweep = run_sweep(points, name=label, backend=backend, workers=workers, store=RunStore())
        seconds = time.perf_counter() - started
        loads.append(os.getloadavg()[0])
        failed = [r for r in sweep.results if "error" in r]
        numbers[label] = [{k: r["metrics"][k] for k in EXACT} for r in sweep.results if "error" not in r]
        rows.append(f"| {label} | {seconds:.1f} | {seconds / len(points):.2f} | {len(failed)} |")
        print(rows[-1], flush=True)
    first = next(iter(numbers.values()))
    same = all(values == first for values in numbers.values())
    base = float(rows[0].split("|")[2])
    lines = [
        "# Sweep: one 8-point grid, sequential vs a local process pool vs a local Ray instance",
        "",
        "`python -m bench.bench_sweep` (this file is its output). " + __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"- fine-tune epochs per point: {args.epochs}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread per point",
        f"- load average (1 min) before and after each backend: {', '.join(f'{x:.2f}' for x in loads)} "
        "(the machine is shared; above about 1, other work slows every number here)",
        "",
        "| backend | wall, s | per point, s | failed points |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- same numbers on every backend ({', '.join(EXACT)}): {'yes' if same else 'NO'}",
        f"- speed-up over sequential: " + ", ".join(
            f"{row.split('|')[1].strip()} {base / float(row.split('|')[2]):.2f}x" for row in rows[1:]),
    ]
    Path(__file__).with_name("RESULTS_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
