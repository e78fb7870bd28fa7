"""Streaming a model larger than memory (issue 22 item 5): whole-process time and peak memory, and parity.

Rows, each its own process under ``/usr/bin/time -v`` (wall, user CPU, peak RSS), load before and after:

* ``7B``: the LLaMA-7B-shaped bf16 folder (`bench/llm_folders.py`, 13.5 GB) streamed: Wanda 50 % on 16
  windows of 512 tokens (``prune --stream``), the streamed perplexity of the base and of the pruned folder
  on the first test batches, the reload check of the pruned folder shard by shard (`check_reload`) and
  its reload with transformers (``reload_hf``: `from_pretrained`, the whole model in memory, ~13.5 GB at
  7 B; `check_from_pretrained`). ``prune_seq`` is the same prune with ``--sequential``.
* ``124M``: GPT-2 124 M (fp32, sharded) streamed and pruned in memory with the same calibration; the
  masks compared weight by weight (`compare_masks`).

    python bench/bench_stream.py 7B --folder /work/big/stream/llama-7b --out bench/RESULTS_llm_scale.md
    python bench/bench_stream.py 7B --folder /work/big/stream/llama-7b --runs reload_hf   # needs ~14 GB free
    python bench/bench_stream.py 124M --folder /work/big/stream/gpt2-124m --out bench/RESULTS_llm_scale.md

The folders are built with `bench/llm_folders.py` (never by the test suite).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CALIB = ["--calib-samples", "16", "--calib-seqlen", "512", "--calib-mode", "windows"]


def timed(command: list[str]) -> dict:
    """Wall, user CPU, peak RSS (GB), load before/after and the last stdout line of one process."""
    before = os.getloadavg()[0]
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after = os.getloadavg()[0]

    def field(name):
        match = re.search(rf"{re.escape(name)}: (.+)", done.stderr)
        return match.group(1).strip() if match else None
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)") or "0"
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    result = {"wall_s": seconds, "user_s": float(field("User time (seconds)") or 0),
              "peak_gb": int(field("Maximum resident set size (kbytes)") or 0) / 1e6, "rc": done.returncode,
              "load": f"{before:.1f} -> {after:.1f}", "last": lines[-1] if lines else ""}
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback", "RuntimeError"))]
        result["error"] = (errors or done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return result


def check_reload(source: str, out: str) -> dict:
    """The pruned folder against the source, shard by shard (never the whole model in memory).

    Its index names the same tensors; every Linear weight of a block is 50 % zeros and equals the
    source where not zero; every other tensor equals the source bit for bit; dtypes kept.
    """
    import torch
    from safetensors import safe_open

    def index(folder):
        return json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
    src, dst = index(source), index(out)
    assert set(src) == set(dst), "tensor names differ"
    checked, pruned, total = 0, 0, 0
    for shard in sorted(set(dst.values())):
        with safe_open(str(Path(out) / shard), framework="pt") as handle:
            names = list(handle.keys())
            for name in names:
                new = handle.get_tensor(name)
                with safe_open(str(Path(source) / src[name]), framework="pt") as original:
                    old = original.get_tensor(name)
                assert new.dtype == old.dtype and new.shape == old.shape, name
                if new.dim() == 2 and (".layers." in name or ".h." in name):
                    zeros = new == 0
                    assert torch.equal(new[~zeros], old[~zeros]), name
                    pruned, total = pruned + int(zeros.sum()), total + zeros.numel()
                else:
                    assert torch.equal(new, old), name
                checked += 1
    return {"tensors": checked, "sparsity": pruned / total, "dtype": str(new.dtype)}


def check_from_pretrained(source: str, out: str) -> dict:
    """Reload the pruned folder as a user would (`AutoModelForCausalLM.from_pretrained`, bf16) and check it.

    Every Linear of a block is 50 % zeros (each weight on its own), every parameter is bf16, the
    parameter count equals the source folder's (summed from its shards' headers, not from the config),
    and one forward on 8 tokens gives finite logits of shape (1, 8, vocabulary).
    """
    import time

    import torch
    import transformers
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})
    source_params = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, trust_remote_code=False)
    load_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    assert params == source_params, f"{params} parameters, the source has {source_params}"
    dtypes = {str(p.dtype) for p in model.parameters()}
    assert dtypes == {"torch.bfloat16"}, dtypes
    sparsities = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            sparsities.append(float((module.weight == 0).sum()) / module.weight.numel())
    assert sparsities and all(abs(s - 0.5) < 1e-6 for s in sparsities), (min(sparsities), max(sparsities))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.arange(1, 9).unsqueeze(0)).logits
    forward_s = time.perf_counter() - start
    assert logits.shape == (1, 8, model.config.vocab_size) and bool(torch.isfinite(logits).all()), logits.shape
    return {"params": params, "block_linears": len(sparsities), "sparsity_min": min(sparsities),
            "sparsity_max": max(sparsities), "dtype": dtypes.pop(), "logits": list(logits.shape),
            "load_s": round(load_s, 1), "forward_s": round(forward_s, 1)}


def compare_masks(folder: str, out: str) -> dict:
    """Prune ``folder`` in memory (`explorer.lean.prune`, the CLI's in-memory path; same calibration and
    per-layer counts) and compare its zeros with the streamed ``out``, weight by weight."""
    import torch

    from explorer import blocks, hf, lean, llm, pipeline, text
    from explorer.layers import effective_weights
    from explorer.specs import ScoringSpec

    bundle = hf.load_hf(folder)
    dataset = text.text_dataset(bundle.tokenizer, seq_len=bundle.model.seq_len)
    scoring = ScoringSpec(criterion="wanda", calib_samples=16, calib_seqlen=512, calib_mode="windows")
    prefixes = tuple(blocks.block_prefixes(bundle.model))
    counts = {name: round(0.5 * module.weight.numel()) for name, module in llm.llm_layers(bundle.model).items()
              if name.startswith(prefixes)}
    lean.prune(bundle.model, "wanda", counts, pipeline.calibration(bundle.model, dataset, scoring))
    expected = effective_weights(bundle.model)
    got = effective_weights(hf.load_hf(out).model)
    differ = sum(int(((got[name] == 0) != (expected[name] == 0)).sum()) for name in counts)
    weights = sum(expected[name].numel() for name in counts)
    assert all(torch.equal(got[name], expected[name]) for name in counts), "kept weights differ"
    return {"layers": len(counts), "weights": weights, "mask_differences": differ}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("size", choices=["7B", "124M", "check-reload", "check-from-pretrained", "compare-masks"])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--pruned", default=None, help="the streamed output folder (default FOLDER-wanda)")
    parser.add_argument("--runs", nargs="+", default=["prune", "ppl_base", "ppl_pruned", "reload"])
    parser.add_argument("--eval-tokens", default="1024")
    parser.add_argument("--out", default=None, help="append the rows to this markdown file")
    args = parser.parse_args()
    pruned = args.pruned or args.folder.rstrip("/") + "-wanda"
    if args.size == "check-reload":
        print(json.dumps(check_reload(args.folder, pruned)))
        return
    if args.size == "check-from-pretrained":
        print(json.dumps(check_from_pretrained(args.folder, pruned)))
        return
    if args.size == "compare-masks":
        print(json.dumps(compare_masks(args.folder, pruned)))
        return
    me = [sys.executable, str(Path(__file__).resolve())]
    stream = [sys.executable, "-m", "explorer", "prune", "--model", f"hf:{args.folder}", "--stream", "--json"]
    ppl = ("import json, sys; from explorer import stream, text, hf; f = stream.open_folder(sys.argv[1]); "
           "t = stream.load_tokenizer(f); d = text.text_dataset(t, seq_len=64); "
           "print(json.dumps(stream.perplexity_folder(f.path, d, max_tokens=int(sys.argv[2]))))")
    runs = {
        "prune": [*stream, "--criterion", "wanda", "--sparsity", "0.5", *CALIB, "--eval", "none", "--out", pruned],
        "prune_seq": [*stream, "--criterion", "wanda", "--sparsity", "0.5", *CALIB, "--sequential", "--eval", "none",
                      "--out", pruned],
        "ppl_base": [sys.executable, "-c", ppl, args.folder, args.eval_tokens],
        "ppl_pruned": [sys.executable, "-c", ppl, pruned, args.eval_tokens],
        "reload": [*me, "check-reload", "--folder", args.folder, "--pruned", pruned],
        "reload_hf": [*me, "check-from-pretrained", "--folder", args.folder, "--pruned", pruned],
        "in_memory": [*me, "compare-masks", "--folder", args.folder, "--pruned", pruned],
    }
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"\n#### {args.size} streamed: {now:%Y-%m-%d %H:%M} UTC, AMD EPYC ({os.cpu_count()} cores, 24 GiB), "
             f"torch {__import__('torch').__version__}\n",
             "| model | run | wall s | user CPU s | peak GB | load 1-min before -> after | result |",
             "|---|---|---|---|---|---|---|"]
    for run in args.runs:
        if run in ("prune", "prune_seq") and Path(pruned).exists():
            shutil.rmtree(pruned)
        result = timed(runs[run])
        shown = result.get("error") or result["last"]
        if run in ("prune", "prune_seq") and not result.get("error"):
            summary = json.loads(result["last"])
            shown = (f"sparsity {summary['sparsity_actual']:.3f}, {summary['calibration']}, {summary['compute_dtype']} "
                     f"compute, {summary['shards']} shards, {summary['bytes'] / 1e9:.2f} GB written, at most "
                     f"{summary['peak_params'] / 1e6:.0f} M parameters in memory")
        line = (f"| {args.size} | {run} | {result['wall_s']:.0f} | {result['user_s']:.0f} | {result['peak_gb']:.2f} | "
                f"{result['load']} | {shown[:400]} |")
        print(line, flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
