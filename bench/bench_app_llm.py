"""The app's Prune page on a causal LM, end to end in one process (AppTest): load an ``hf:`` folder on the
Model page, pick the scoring on the Prune page, Apply, wait for the job. Run it under ``/usr/bin/time -v``
for the whole app process's peak RSS (issue 22: the app prunes LLMs through `explorer.lean`).

    python bench/llm_folders.py gpt2-124M /work/big/gpt2-124m --dtype float32
    /usr/bin/time -v python bench/bench_app_llm.py /work/big/gpt2-124m --criterion wanda --scope local
    /usr/bin/time -v python bench/bench_app_llm.py /work/big/gpt2-124m --criterion magnitude --scope global

Prints one JSON line: the settings, the seconds of each step, the page's figures (perplexity, non-zero
parameters), which path prepared the plan (lean or general) and the process's own peak RSS
(``ru_maxrss``). The run database is a temporary folder (``PRUNING_EXPLORER_DATA``). Never part of the
test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--criterion", default="wanda")
    parser.add_argument("--scope", default="local", choices=["local", "global"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=4, help="calibration batches (the page's slider)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PRUNING_EXPLORER_DATA", tempfile.mkdtemp(prefix="bench_app_llm_"))
    from streamlit.testing.v1 import AppTest

    from app_pages import common

    timings, started = {}, time.perf_counter()

    def step(name: str) -> None:
        nonlocal started
        timings[name] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    def check(at) -> None:
        if at.exception or at.error:
            raise SystemExit(f"the page failed: {[e.value for e in at.exception]} {[e.value for e in at.error]}")

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=3600)
    at.session_state["model_autoloaded"] = True
    at.run()
    at.switch_page("app_pages/model.py").run()
    at.radio(key="model_source").set_value("Transformer").run()
    at.selectbox(key="tf_model").set_value(common.TRANSFORMER_FOLDER).run()
    at.text_input(key="tf_folder").set_value(str(Path(args.folder).resolve())).run()
    at.button(key="tf_load").click().run()
    check(at)
    step("load_s")
    at.switch_page("app_pages/prune.py").run()
    at.radio(key="prune_structure").set_value("unstructured").run()
    at.selectbox(key="prune_criterion").set_value(args.criterion).run()
    at.radio(key="prune_scope").set_value(args.scope).run()
    if args.criterion in ("wanda", "sparsegpt"):
        at.slider(key="prune_calib").set_value(args.calib).run()
    at.session_state["prune_sparsity"] = args.sparsity
    at.run()
    check(at)
    step("plan_s")
    prepared = next(iter(v for k, v in at.session_state[common.PREPARED].items()
                         if k[0] == at.session_state[common.MODEL]["key"] and k[1].criterion == args.criterion))
    at.button(key="prune_apply").click().run()
    check(at)
    step("apply_s")
    metrics = at.session_state[common.PRUNED]["metrics"]
    result = {"folder": args.folder, "criterion": args.criterion, "scope": args.scope, "sparsity": args.sparsity,
              "path": "lean" if prepared.lean else "general", **timings,
              "perplexity": metrics["task"], "params_nonzero": metrics["params_nonzero"],
              "params_total": metrics["params_total"], "sparsity_actual": metrics["sparsity_actual"],
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
