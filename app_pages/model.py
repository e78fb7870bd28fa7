"""Model: choose what to prune (zoo model, model file, Python factory or transformer) and the data it sees."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from explorer import baselines, compat, hf, jobs, pipeline, stats, tasks
from explorer.data import DATASETS, tensors
from explorer.errors import ExplorerError
from explorer.models import ZOO, load_model, read_saved_metadata
from explorer.specs import ModelSpec
from explorer.train import TrainConfig, evaluate, start_training
from app_pages import common

st.title("Model")
common.explain("""
Pruning starts from a **trained** network: the question is how much of it can go before it
forgets what it learned. Pick one of four sources:

* **Built-in zoo** - small architectures chosen because each shows a pruning idea: an MLP
  (neurons), LeNet-5 (a small CNN), a VGG-style stack (filters), ResNet-20 (residual adds tie
  channels together) and a small MobileNetV2 (depthwise convolutions). The first time a pair is
  chosen it is trained (the *baseline*) and kept on disk, so next time it loads in a moment.
* **Model file** - your own weights: a state dict (`.pt`, `.pth`, `.safetensors`, plus the
  architecture it belongs to), TorchScript, a `torch.export` program (`.pt2`) or a file saved
  by this app. Files are read without running code from them; a pickled model needs your
  explicit trust.
* **Python factory** - `package.module:function`, called with the input shape and class count.
* **Transformer** - a built-in one (the real pretrained sentence encoder all-MiniLM-L6-v2, or tiny
  random BERT / GPT-2 models for quick experiments) or a local Hugging Face folder (config, weights
  and tokenizer; nothing is downloaded), fed with text: built-in English sentences, or your own
  `.txt` (one example a line), `.jsonl` (`text` and optional `label`) or `.csv` (a `text` column).

The table lists every layer with parameters: its kind, weight shape, parameter count and
FLOPs (multiply-adds counted as two operations, for one input). Conv and Linear layers are the
ones pruning can touch. The **baseline** is the model's task metric on the held-out test split; every
pruned model is compared with it. What "good" means depends on the model: **accuracy** for a
classifier on labelled data, **perplexity** for a language model (lower is better), and otherwise
**fidelity** to the dense model: how often the pruned copy picks the same top class (top-1
agreement), or how close its sentence embeddings stay (cosine similarity). The dense model's
fidelity to itself is 100 % by definition.
""")

TEXT_TYPES = ["txt", "jsonl", "csv"]
FILE_FACTORY = "a Python factory I name"  # code a file is loaded into is named by the user, never by the file
LOCAL_FOLDER = common.TRANSFORMER_FOLDER

DATASET_LABELS = {name: f"{name} - {DATASETS[name].description}" for name in (*common.ZOO_DATASETS, "tensors")}


def pick_dataset(prefix: str, default: str = "digits"):
    """Dataset selector; for 'tensors' also a file uploader. Returns a Dataset or None."""
    names = list(DATASET_LABELS)
    name = st.selectbox("Dataset", names, index=names.index(default), format_func=DATASET_LABELS.get,
                        key=f"{prefix}_dataset")
    if name != "tensors":
        return common.shared_dataset(name)
    upload = st.file_uploader("Data file (.pt dict or .npz with x and y)", type=["pt", "npz"], key=f"{prefix}_data")
    if upload is None:
        st.info("Upload a data file to continue.")
        return None
    return tensors(upload.getvalue(), name="tensors")


def data_fields(data) -> dict:
    """The ModelSpec fields that name the data: a built-in name, or 'tensors' and the uploaded file's name."""
    if data.name != "tensors":
        return {"data": data.name}
    upload = next((st.session_state.get(f"{prefix}_data") for prefix in ("zoo", "file", "factory")
                   if st.session_state.get(f"{prefix}_data") is not None), None)
    return {"data": "tensors", "data_file": upload.name if upload is not None else "tensors.pt"}


def train_then(module, data, epochs: int, finish) -> None:
    """Train a fresh (file or factory) model for a few epochs in a background job, with a progress bar and a
    Cancel button (`follow_training` below); ``finish(trained module, note)`` then makes the session-model
    entry. A cancel keeps the partly trained model, and its entry says how far it got."""
    job = start_training(module, data, TrainConfig(epochs=epochs, lr=1e-3), name="Training")
    job.meta.update(finish=finish, epochs=epochs)
    st.session_state[TRAIN_JOB] = job


class _BaseStopped(Exception):
    """A Cancel seen between two batches of a base perplexity."""


def measure_base_then(source: str, module, data) -> None:
    """A language model's base perplexity (the default token budget's test tokens, `MeasureSpec.eval_tokens`; the
    whole split took about a minute at 124 M, minutes at 1 B) as a
    background job with a bar line per batch and a Cancel (`follow_training`); the model's entry follows it.
    A cancel keeps nothing: the model loaded before stays."""
    def work(context):
        def report(fraction: float, line: str) -> None:
            if context.cancel.is_set():
                raise _BaseStopped
            context.report(fraction, line)
        try:
            return common.transformer_task(source, module, data, progress=report)
        except _BaseStopped:
            return None
    job = jobs.start(work, name=f"Measuring the base perplexity of {source}")
    job.meta.update(finish=lambda: common.transformer_entry(source), source=source)
    st.session_state[TRAIN_JOB] = job


def follow_training():
    """The entry of the model whose training (or base perplexity) just ended (None while it runs, or when there
    is none, or when the base perplexity was cancelled)."""
    job = st.session_state.get(TRAIN_JOB)
    if job is None or not common.follow_job(job, cancel_key="model_train_cancel", what=job.name):
        return None
    del st.session_state[TRAIN_JOB]
    if job.error is not None:
        raise ExplorerError(job.error)
    if "source" in job.meta:  # a language model's base perplexity
        if job.result is None:
            st.info(f"Loading {job.meta['source']} cancelled while its base perplexity was measured; the model "
                    "loaded before stays.", icon=":material/info:")
            return None
        return job.meta["finish"]()
    result = job.result
    epochs = job.meta["epochs"]
    note = (f", training cancelled after {result.epochs_done} of {epochs} epoch{'' if epochs == 1 else 's'}"
            if result.cancelled else "")
    return job.meta["finish"](result.model.cpu().eval(), note)


TRAIN_JOB = "model_train_job"


def load_zoo(model_name: str, dataset_name: str, data) -> dict:
    if dataset_name != "tensors":
        return common.zoo_entry(model_name, dataset_name)
    bar = st.progress(0.0, text="Training the baseline on your data ...")
    base = baselines.baseline(model_name, data, use_cache=False,
                              progress=lambda p: bar.progress(p.fraction, text=f"Training: epoch {p.epoch}/{p.epochs}"))
    bar.empty()
    return {"module": base.model, "label": model_name, "arch": model_name, "dataset": data, "source": "zoo",
            "spec": ModelSpec(source=model_name, baseline=True, **data_fields(data)),
            "base_accuracy": base.accuracy, "task": common.accuracy_task(base.accuracy),
            "key": f"zoo:{model_name}:tensors:{id(data)}",
            "origin": f"trained in {base.train_seconds:.1f} s"}


def load_file(upload, data, arch: str | None, trust_pickle: bool, epochs: int) -> dict:
    suffix = Path(upload.name).suffix or ".pt"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / (Path(upload.name).name or f"upload{suffix}")
        path.write_bytes(upload.getvalue())
        module = load_model(str(path), input_shape=data.input_shape, num_classes=data.num_classes, arch=arch,
                            trust_pickle=trust_pickle)
        if arch is None:  # a file saved by this app knows its architecture; runs then keep their weights
            try:
                arch = read_saved_metadata(path)["arch"]
            except ExplorerError:
                arch = None
    module.eval()
    tasks.check_forward(module, data, f"'{upload.name}'")
    spec = ModelSpec(source=upload.name, arch=arch, baseline=False, train_epochs=epochs, trust_pickle=trust_pickle,
                     **data_fields(data))
    key = f"file:{upload.file_id}:{arch}:{data.name}:{epochs}"

    def finish(module, note: str = "") -> dict:
        accuracy = evaluate(module, data, "test")["accuracy"]
        return {"module": module, "label": upload.name, "arch": arch, "dataset": data, "source": "file", "spec": spec,
                "base_accuracy": accuracy, "task": common.accuracy_task(accuracy), "key": key + note,
                "origin": f"uploaded file{f', trained {epochs} epoch' + ('' if epochs == 1 else 's') if epochs else ''}"
                          + note}
    if epochs:
        return train_then(module, data, epochs, finish)
    return finish(module)


def load_factory(spec: str, data, epochs: int) -> dict:
    module = load_model(spec.strip(), input_shape=data.input_shape, num_classes=data.num_classes)
    tasks.check_forward(module.eval(), data, f"'{spec.strip()}'")
    model_spec = ModelSpec(source=spec.strip(), baseline=False, train_epochs=epochs, **data_fields(data))

    def finish(module, note: str = "") -> dict:
        module.eval()
        accuracy = evaluate(module, data, "test")["accuracy"]
        trained = f", trained {epochs} epoch{'' if epochs == 1 else 's'}" if epochs else " (untrained)"
        return {"module": module, "label": spec.strip(), "arch": spec.strip(), "dataset": data, "source": "factory",
                "spec": model_spec, "base_accuracy": accuracy, "task": common.accuracy_task(accuracy),
                "key": f"factory:{spec.strip()}:{data.name}:{epochs}{note}",
                "origin": f"built by the factory{trained}{note}"}
    if epochs:
        return train_then(module, data, epochs, finish)
    return finish(module)


def load_transformer(source: str, upload) -> dict:
    """A built-in transformer or ``hf:FOLDER`` through `pipeline.resolve_model` (the CLI's path), on text.

    The built-in text gives a shared cached model; an uploaded file is written to a temporary file
    under its own name (the text layer reads the format from the suffix) and tokenised for this session.
    """
    if upload is None:
        with st.spinner(f"Loading {source} and tokenising the built-in text (once per server) ..."):
            module, data, _ = common.shared_transformer(source)
        if source in common.BASE_TASKS or tasks.task_for(module, data) != "perplexity":
            return common.transformer_entry(source)
        measure_base_then(source, module, data)  # followed by `follow_training`, with a bar and Cancel
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / (Path(upload.name).name or "upload.txt")
        path.write_bytes(upload.getvalue())
        module, data, arch = pipeline.resolve_model(ModelSpec(source=source, data="text", data_file=str(path),
                                                              baseline=False))
    task = common.task_of(module, data)
    return {"module": module, "label": source, "arch": arch, "dataset": data, "source": "transformer",
            "spec": ModelSpec(source=source, data="text", data_file=upload.name, baseline=False),
            "base_accuracy": task["base"] if task["name"] == "accuracy" else None, "task": task,
            "key": f"transformer:{source}:{upload.file_id}", "origin": common.transformer_origin(source, module)}


def use_usual_dataset() -> None:
    """Picking an architecture also picks the dataset it is usually shown on (the user can change it)."""
    st.session_state["zoo_dataset"] = ZOO[st.session_state["zoo_model"]].default_dataset


source = st.radio("Source", ["Built-in zoo", "Model file", "Python factory", "Transformer"], horizontal=True,
                  key="model_source")
loaded = None
try:
    if source == "Built-in zoo":
        left, right = st.columns(2)
        with left:
            model_name = st.selectbox("Architecture", list(ZOO), key="zoo_model",
                                      format_func=lambda n: f"{n} - {ZOO[n].description}",
                                      on_change=use_usual_dataset)
            st.caption(f"Usual dataset for {model_name}: **{ZOO[model_name].default_dataset}**. "
                       "The first load of a pair trains it once (then it is cached on disk): seconds for mlp on digits, "
                       "minutes for the conv nets on a CPU.")
        with right:
            data = pick_dataset("zoo")
        clicked = st.button("Load model", type="primary", key="zoo_load")
        first_visit = common.current_model() is None and not st.session_state.get("model_autoloaded")
        if data is not None and (clicked or first_visit):
            st.session_state["model_autoloaded"] = True
            loaded = load_zoo(model_name, data.name, data)
    elif source == "Model file":
        left, right = st.columns(2)
        with left:
            upload = st.file_uploader("Model file", type=["pt", "pth", "safetensors", "ts", "pt2"], key="model_file")
            arch_choice = st.selectbox("Architecture (for a plain state dict)",
                                       ["(stored in the file)", *ZOO, FILE_FACTORY], key="file_arch",
                                       help="A file may name a zoo model; a factory runs only when you name it here.")
            file_factory = ""
            if arch_choice == FILE_FACTORY:
                file_factory = st.text_input("Factory (package.module:callable)", key="file_factory",
                                             placeholder="mypackage.models:make")
            trust = st.checkbox("I trust this file: allow a pickled model (runs code from the file)", key="file_trust")
        with right:
            data = pick_dataset("file")
            epochs = st.number_input("Train epochs before pruning (0 = use as is)", 0, 100, 0, key="file_epochs")
        if st.button("Load file", type="primary", key="file_load", disabled=upload is None or data is None):
            arch = file_factory.strip() or None if arch_choice == FILE_FACTORY else \
                None if arch_choice.startswith("(") else arch_choice
            loaded = load_file(upload, data, arch, trust, int(epochs))
    elif source == "Python factory":
        left, right = st.columns(2)
        with left:
            spec = st.text_input("Factory (package.module:callable)", "explorer.zoo:mlp", key="factory_spec",
                                 help="Called with input_shape and num_classes if it accepts them.")
        with right:
            data = pick_dataset("factory")
            epochs = st.number_input("Train epochs (a factory gives untrained weights)", 0, 100, 5, key="factory_epochs")
        if st.button("Build", type="primary", key="factory_load", disabled=data is None):
            loaded = load_factory(spec, data, int(epochs))
    else:
        left, right = st.columns(2)
        with left:
            choice = st.selectbox("Transformer", [*hf.BUILTIN, LOCAL_FOLDER], key="tf_model",
                                  format_func=lambda n: n if n == LOCAL_FOLDER else f"{n} - {hf.BUILTIN[n]}")
            folder = ""
            if choice == LOCAL_FOLDER:
                folder = st.text_input("Folder (config.json, weights and tokenizer files)", key="tf_folder",
                                       placeholder="/path/to/model", help="Loaded offline: nothing is downloaded.")
        with right:
            text_source = st.radio("Text", ["built-in English text", "my text file"], horizontal=True, key="tf_text")
            upload = None
            if text_source == "my text file":
                upload = st.file_uploader("Text file: .txt (one example a line), .jsonl (text, optional label) "
                                          "or .csv (a text column, optional label)", type=TEXT_TYPES, key="tf_data")
            else:
                st.caption("Sentences from the Python standard library's docstrings: real English, unlabelled.")
        source_name = choice if choice != LOCAL_FOLDER else f"hf:{folder.strip()}"
        missing = (choice == LOCAL_FOLDER and not folder.strip()) or (text_source == "my text file" and upload is None)
        if st.button("Load transformer", type="primary", key="tf_load", disabled=missing):
            with st.spinner(f"Loading {source_name} and tokenising the text ..."):
                loaded = load_transformer(source_name, upload)
    if loaded is None:
        loaded = follow_training()  # a file or factory training started by a click, this run or an earlier one
except ExplorerError as exc:
    st.error(str(exc))

if loaded is not None:
    common.set_model(loaded)
    st.rerun()  # so the sidebar card shows the new model

model = common.current_model()
if model is None:
    st.stop()

st.subheader(f"{model['label']} on {model['dataset'].name}")
st.caption(f"{model['origin']}. {model['dataset'].description}")
try:
    rows = stats.layer_table(model["module"], model["dataset"].example_input(1))
except ExplorerError as exc:
    st.error(str(exc))
    st.stop()
table = pd.DataFrame(rows)
sizes = model["dataset"].sizes
cols = st.columns(4)
task = common.model_task(model)
cols[0].metric(f"Baseline {common.task_label(task)} (test)", common.fmt_task(task, task["base"]),
               help=None if task["name"] == "accuracy" else f"Lower is better.{common.tokens_help(task)}"
               if not task["higher_is_better"]
               else "The dense model agrees with itself perfectly; pruned copies are measured against it.")
cols[1].metric("Parameters", common.fmt_int(table["params"].sum()))
cols[2].metric("FLOPs per input", common.fmt_int(table["flops"].sum()))
cols[3].metric("Train / val / test", f"{sizes['train']:,} / {sizes['val']:,} / {sizes['test']:,}")
st.dataframe(table, hide_index=True, column_config={
    "params": st.column_config.NumberColumn("parameters", format="localized"),
    "flops": st.column_config.NumberColumn("FLOPs", format="localized"),
    "prunable": st.column_config.CheckboxColumn("prunable"),
})


def compatibility(model: dict) -> None:
    """Before any cut: what each structure can prune in this model, what is left out and why, what scoring costs."""
    st.subheader("Compatibility")
    key = ("model_compat_report", model["key"])
    if st.button("Check what each structure can prune", key="model_compat",
                 help="Traces the model with torch-pruning and times one calibration batch; nothing is pruned."):
        try:
            st.session_state[key] = compat.report(model["module"], model["dataset"].example_input(1))
        except ExplorerError as exc:
            st.error(str(exc))
    result = st.session_state.get(key)
    if result is None:
        st.caption("Unstructured, N:M, channel and head pruning each need something of the model; the check says "
                   "which layers each can cut, which groups torch-pruning could not trace and why, the steps head "
                   "counts impose, and the estimated cost of scoring, before any work.")
        return
    st.dataframe(pd.DataFrame([{
        "structure": name, "ok": entry["ok"], "units": len(entry["units"]), "left out": len(entry["left_out"]),
        "why": entry["reason"] or "; ".join(f"{left['name']}: {left['reason']}" for left in entry["left_out"])[:400],
    } for name, entry in result["structures"].items()]), hide_index=True, key="model_compat_table")
    for line in result["constraints"]:
        st.caption(f"Heads: {line}")
    scoring = result["scoring"]
    st.dataframe(pd.DataFrame([{"criterion": name, "forward passes": cost["forward_passes"],
                                "estimated seconds": round(cost["seconds"], 2)}
                               for name, cost in scoring["criteria"].items()]), hide_index=True,
                 key="model_compat_cost")
    st.caption(f"Scoring cost for {scoring['calib_batches']} calibration batches of {scoring['calib_batch_size']}, "
               f"priced by one timed forward ({scoring['forward_seconds'] * 1000:.1f} ms on this machine, now).")


compatibility(model)
st.page_link("app_pages/inspect.py", label="Next: look inside the layers", icon=":material/arrow_forward:")
