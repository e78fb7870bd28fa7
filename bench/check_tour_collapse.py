"""Does the Tour's scope demo show a collapse under global scope and none under local, on every zoo model?

For each zoo model on its usual dataset, the trained baseline (the zoo's cached one; trained here once
if missing, which takes minutes for the conv nets on a CPU) goes through `explorer.tour.how_to_decide`,
the very call Tour question 2 makes; the check reads the two plans the page draws: global must empty a
layer, local must not. Writes bench/RESULTS_tour_collapse.md (machine, date, load, time per model).

    python -m bench.check_tour_collapse                 # every zoo model
    python -m bench.check_tour_collapse --models mlp,lenet5 --out -
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

from bench.common import cpu_model
from explorer import pipeline, tour
from explorer.specs import ModelSpec
from explorer.zoo import ZOO

RESULTS = Path(__file__).with_name("RESULTS_tour_collapse.md")


def check(model_name: str) -> dict:
    """The scope demo of one trained zoo model: the criterion and sparsity chosen, what each scope empties."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    model, data, _ = pipeline.resolve_model(ModelSpec(model_name))
    loaded = time.perf_counter() - started
    decide = tour.how_to_decide(model, data)
    plans = decide["plans"]
    return {"model": model_name, "dataset": data.name, "criterion": decide["collapse_criterion"],
            "sparsity": decide["collapse_sparsity"], "global": list(plans["global"].collapsed),
            "local": list(plans["local"].collapsed), "shown": decide["collapse_shown"],
            "text": tour.collapse_demo_text(decide), "load_s": loaded,
            "demo_s": time.perf_counter() - started - loaded, "load": load}


def render(rows: list[dict], wall_s: float, load_start: float) -> str:
    lines = ["# Tour question 2: a collapse under global scope, none under local, on every zoo model\n",
             f"*Run {datetime.date.today().isoformat()} on {cpu_model()}, nproc {os.cpu_count()}, torch "
             f"{torch.__version__}, cpu; load average (1 min) {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at "
             f"end; {wall_s:.0f} s wall; `{' '.join(['python -m bench.check_tour_collapse', *sys.argv[1:]])}`*\n",
             "Each model is the zoo's trained baseline on its usual dataset; the demo is `tour.how_to_decide`, as "
             "the page computes it (criterion and sparsity picked from the model's collapse points).\n",
             "| model / dataset | criterion, sparsity shown | global empties | local empties | verdict | "
             "baseline s | demo s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ok = bool(row["global"]) and not row["local"]
        lines.append(f"| {row['model']} / {row['dataset']} | {row['criterion']}, {row['sparsity']:.1%} | "
                     f"{', '.join(row['global']) or 'nothing'} | {', '.join(row['local']) or 'nothing'} | "
                     f"{'✅ collapse shown' if ok else '❌ not shown'} | {row['load_s']:.0f} | {row['demo_s']:.0f} |")
    lines += ["", "What the page says beside the demo, per model:", ""]
    lines += [f"- **{row['model']}**: {row['text']}" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma list of zoo models")
    parser.add_argument("--out", default=str(RESULTS), help="results file, or - to print")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start, started, rows = os.getloadavg()[0], time.perf_counter(), []
    for name in args.models.split(","):
        rows.append(check(name))
        print(f"{name}: global {rows[-1]['global']} local {rows[-1]['local']} ({rows[-1]['criterion']} "
              f"{rows[-1]['sparsity']:.3f}); {rows[-1]['load_s']:.0f} + {rows[-1]['demo_s']:.0f} s", file=sys.stderr,
              flush=True)
    text = render(rows, time.perf_counter() - started, load_start)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
