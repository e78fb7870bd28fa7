"""LLM pruning at scale: whole-process time and peak memory of the CLI on GPT-2-shaped models (issue 22).

Builds each model itself (random weights from a GPT2Config, a small byte-level BPE tokenizer; the
embedding keeps GPT-2's 50,257 rows) as an ``hf:`` folder in a temporary directory, then runs
``python -m explorer`` commands as separate processes under ``/usr/bin/time -v``: a bare load of
the folder, ``prune --plan-only``, a full ``prune`` (magnitude, global 50 %), Wanda, 2:4 and SparseGPT.
User CPU seconds are quoted beside wall time because the machine is shared.

    python bench/bench_llm_scale.py --sizes 7M 124M [--runs plan magnitude wanda] [--out bench/RESULTS_llm_scale.md]

The folders are deleted at the end. Never part of the test suite.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the models are built with this checkout's explorer.hf
SIZES = {  # GPT-2 family shapes (vocab 50,257, 1,024 positions)
    "7M": dict(n_layer=2, n_embd=128, n_head=4),
    "124M": dict(n_layer=12, n_embd=768, n_head=12),
    "355M": dict(n_layer=24, n_embd=1024, n_head=16),
}
LLAMA_SIZES = {  # LLaMA shapes (vocab 32,000, grouped-query attention); 1.1B is TinyLlama's
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4),
}
CALIB = ["--calib-samples", "32", "--calib-seqlen", "128", "--calib-mode", "windows"]
RUNS = {
    "load": None,
    "plan": ["--criterion", "magnitude", "--scope", "global", "--sparsity", "0.5", "--plan-only"],
    "magnitude": ["--criterion", "magnitude", "--scope", "global", "--sparsity", "0.5", "--no-latency-placeholder"],
    "magnitude_again": ["--criterion", "magnitude", "--scope", "global", "--sparsity", "0.5"],  # base figures cached
    "plan_local": ["--criterion", "magnitude", "--sparsity", "0.5", "--plan-only"],
    "magnitude_local": ["--criterion", "magnitude", "--sparsity", "0.5"],
    "wanda": ["--criterion", "wanda", "--sparsity", "0.5", *CALIB],
    "wanda_seq": ["--criterion", "wanda", "--sparsity", "0.5", *CALIB, "--sequential"],
    "nm_2_4": ["--criterion", "wanda", "--structure", "nm", "--nm", "2:4", *CALIB],
    "sparsegpt": ["--criterion", "sparsegpt", "--sparsity", "0.5", *CALIB],
}
LOAD = ("import sys, explorer.hf as hf; bundle = hf.load_hf(sys.argv[1]); "
        "print(sum(p.numel() for p in bundle.model.parameters()))")


def build(folder: Path, size: str) -> int:
    """Write a random GPT-2 (or LLaMA) of ``size`` and a small tokenizer to ``folder``; its parameter count.

    A folder already holding a ``config.json`` is reused (``--folders`` keeps them between runs)."""
    import torch
    import transformers

    from explorer import hf

    if (folder / "config.json").exists():
        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    tokenizer = hf.tiny_tokenizer("gpt2", vocab_size=2000)
    if size in LLAMA_SIZES:
        return _build_llama(folder, size, tokenizer)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     **SIZES[size])
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _build_llama(folder: Path, size: str, tokenizer) -> int:
    """A random LLaMA in fp32 (TinyLlama's shape for 1.1B), untied head, saved in 1 GB shards."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **LLAMA_SIZES[size])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def timed(command: list[str], code: Path = ROOT, cache: str | None = None) -> dict:
    """Wall seconds, user CPU seconds and peak RSS (GB) of one process, from /usr/bin/time -v."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PRUNING_EXPLORER_CACHE": cache} if cache else {})}
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=code, env=env)
    report = done.stderr

    def field(name):
        match = re.search(rf"{re.escape(name)}: (.+)", report)
        return match.group(1).strip() if match else None
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall else [0]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    result = {"wall_s": seconds, "user_s": float(field("User time (seconds)") or 0),
              "peak_gb": int(field("Maximum resident set size (kbytes)") or 0) / 1e6, "rc": done.returncode}
    if done.returncode:
        result["error"] = (report.strip().splitlines() or ["?"])[0][:200]
    elif '"base_cached"' in done.stdout:
        result["error"] = "base figures from the cache"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["7M", "124M"], choices=[*SIZES, *LLAMA_SIZES])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default=None, help="append a markdown table to this file")
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose explorer runs (e.g. main, for 'before')")
    parser.add_argument("--label", default="", help="a word for the code, e.g. before / after")
    parser.add_argument("--folders", default=None,
                        help="keep the model folders here and reuse them (default: a temporary directory)")
    parser.add_argument("--build-only", action="store_true", help="build the folders and stop")
    parser.add_argument("--calib", nargs=2, type=int, metavar=("SAMPLES", "SEQLEN"), default=None,
                        help="calibration windows for wanda / 2:4 / sparsegpt (default 32 x 128)")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="pass --eval-tokens N to every full prune (0: the whole split; default: the CLI's)")
    parser.add_argument("--cache", default=None,
                        help="PRUNING_EXPLORER_CACHE for the runs (default: a fresh one, so the first prune is cold)")
    args = parser.parse_args()
    load = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc)
    settings = " ".join(filter(None, [f"calibration {args.calib[0]} x {args.calib[1]}" if args.calib else "",
                                      f"--eval-tokens {args.eval_tokens}" if args.eval_tokens is not None else ""]))
    lines = [f"\n### {args.label or Path(args.code).name}: {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}"
             f" ({os.cpu_count()} cores), load at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
             f"{', ' + settings if settings else ''}\n",
             "| model | params | run | wall s | user CPU s | peak GB | peak / fp32 size | load before / after | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    def keep(line: str) -> None:  # each row reaches the results file as soon as it is measured
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")

    for line in lines:
        keep(line)
    with tempfile.TemporaryDirectory(prefix="llm_scale_") as tmp:
        for size in args.sizes:
            family = "llama" if size in LLAMA_SIZES else "gpt2"
            folder = Path(args.folders or tmp) / f"{family}-{size}"
            params = build(folder, size)
            if args.build_only:
                print(f"{folder}: {params / 1e6:.0f} M parameters", flush=True)
                continue
            fp32_gb = params * 4 / 1e9
            for run in args.runs:
                if run == "load":
                    command = [sys.executable, "-c", LOAD, str(folder)]
                else:
                    flags = [f for f in RUNS[run] if f != "--no-latency-placeholder"]
                    if args.calib and "--calib-samples" in flags:
                        flags[flags.index("--calib-samples") + 1] = str(args.calib[0])
                        flags[flags.index("--calib-seqlen") + 1] = str(args.calib[1])
                    if args.eval_tokens is not None and "--plan-only" not in flags:
                        flags += ["--eval-tokens", str(args.eval_tokens)]
                    command = [sys.executable, "-m", "explorer", "prune", "--model", f"hf:{folder}", "--json",
                               *flags]
                before = os.getloadavg()[0]
                result = timed(command, Path(args.code), cache=args.cache or str(Path(tmp) / "cache"))
                after = os.getloadavg()[0]
                note = result.get("error", "")
                line = (f"| {'LLaMA' if family == 'llama' else 'GPT-2'} {size} | {params / 1e6:.0f} M | {run} | {result['wall_s']:.0f} | {result['user_s']:.0f}"
                        f" | {result['peak_gb']:.2f} | {result['peak_gb'] / fp32_gb:.1f}x | {before:.1f} / {after:.1f}"
                        f" | {note} |")
                keep(line)
    load = os.getloadavg()
    keep(f"\nload at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
