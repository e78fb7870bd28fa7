"""What every page shares: cached base models and datasets, per-session state, small helpers.

Not a page (app.py does not list it). Objects returned by the ``st.cache_resource``
functions are shared by every browser session and are never modified: pruning and
training always work on copies (`explorer.pipeline.apply` and `explorer.train.train`
copy). Everything that belongs to one user lives in ``st.session_state`` under the keys
below.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import streamlit as st

from explorer import baselines, pipeline
from explorer.store import Run, RunStore
from explorer.train import Progress, TrainConfig, TrainResult, train
from explorer.data import Dataset, load_dataset
from explorer.errors import ExplorerError

# st.session_state keys (one place, so pages agree on them)
MODEL = "current_model"        # dict: module, label, arch, dataset (Dataset), source, base_accuracy, key
PREPARED = "prepared_cache"    # {(model key, structure, criterion, calib): pipeline.Prepared}
PRUNED = "pruned_result"       # dict: module, settings, plan, metrics, run_id, model_key
FINETUNE_JOB = "finetune_job"  # pages.finetune.FinetuneJob
PRUNE_SETTINGS = "prune_settings"  # last settings of the Prune page: structure, criterion, scope, sparsity ...

ZOO_DATASETS = ("digits", "mnist1d", "shapes")


@st.cache_resource(show_spinner=False)
def shared_dataset(name: str, seed: int = 0) -> Dataset:
    """A built-in dataset, loaded once per server and shared (read-only) by all sessions."""
    return load_dataset(name, seed=seed)


@st.cache_resource(show_spinner=False, max_entries=8)
def shared_baseline(model_name: str, dataset_name: str) -> baselines.Baseline:
    """The trained baseline of a zoo model, shared by all sessions: never mutate ``.model``."""
    return baselines.baseline(model_name, shared_dataset(dataset_name))


def baseline_with_progress(model_name: str, dataset_name: str) -> baselines.Baseline:
    """Train the baseline with a visible progress bar if it is not on disk, then share it.

    The training itself runs outside ``st.cache_resource`` (whose replay cannot update a
    progress bar created outside it); the cached call then reads the weights from disk.
    """
    data = shared_dataset(dataset_name)
    config = baselines.default_config(model_name, dataset_name, train_size=len(data.y_train))
    on_disk = baselines.is_cached(model_name, dataset_name, config)
    if not on_disk:
        bar = st.progress(0.0, text=f"Training the {model_name} baseline on {dataset_name} ...")

        def report(progress) -> None:
            text = f"Training the {model_name} baseline: epoch {progress.epoch}/{progress.epochs}, loss {progress.loss:.3f}"
            bar.progress(progress.fraction, text=text)

        baselines.baseline(model_name, data, config=config, progress=report)
        bar.empty()
    return shared_baseline(model_name, dataset_name)


def current_model() -> dict | None:
    return st.session_state.get(MODEL)


def require_model() -> dict:
    """The session's model, or a pointer to the Model page and a stop."""
    model = current_model()
    if model is None:
        st.info("No model loaded yet. Choose one on the Model page first.")
        st.page_link("pages/model.py", label="Go to the Model page", icon=":material/arrow_forward:")
        st.stop()
    return model


def explain(markdown: str) -> None:
    """The page's 'What am I looking at?' expander."""
    with st.expander("What am I looking at?"):
        st.markdown(markdown)


def prepared_for(model: dict, structure: str, criterion: str, *, calib_batches: int = 4) -> pipeline.Prepared:
    """Scores sorted once per (model, structure, criterion), kept for this session only."""
    cache = st.session_state.setdefault(PREPARED, {})
    key = (model["key"], structure, criterion, calib_batches)
    if key not in cache:
        with st.spinner(f"Scoring {structure} units by {criterion} ..."):
            cache[key] = pipeline.prepare(model["module"], structure, criterion, dataset=model["dataset"],
                                          calib_batches=calib_batches)
    return cache[key]


def set_model(entry: dict) -> None:
    """Make ``entry`` the session's model and forget everything derived from the previous one."""
    st.session_state[MODEL] = entry
    for key in [PREPARED, PRUNED, PRUNE_SETTINGS, *(k for k in st.session_state if str(k).startswith("prune_"))]:
        st.session_state.pop(key, None)
    job = st.session_state.pop(FINETUNE_JOB, None)
    if job is not None:
        job.cancel.set()


def measure_and_save(model: dict, pruned_module, settings: dict, *, history=None, name: str = "") -> Run:
    """Measure a pruned copy next to its base (accuracy, FLOPs, size, latency) and store it as a run.

    Weights are stored only when the architecture is known (zoo name or factory), since a
    stored file is rebuilt from it.
    """
    data = model["dataset"]
    with st.status("Measuring accuracy, parameters, FLOPs, size and latency (base and pruned, same batch) ...",
                   expanded=False) as status:
        metrics = pipeline.measure_run(model["module"], pruned_module, data, base_accuracy=model["base_accuracy"])
        status.update(label="Measured.", state="complete")
    run = Run(model_name=model["label"], dataset=data.name, structure=settings["structure"],
              criterion=settings["criterion"], scope=settings["scope"], sparsity=float(settings["sparsity"]),
              settings={**settings, "arch": model["arch"], "input_shape": list(data.input_shape),
                        "num_classes": data.num_classes, "model_source": model["source"]},
              metrics=metrics, history=list(history or []), name=name)
    return RunStore().save(run, pruned_module if model["arch"] else None)


@dataclass
class FinetuneJob:
    """One fine-tune running in a background thread; the page polls it and never blocks.

    ``cancel`` is the flag `explorer.train.train` checks before every step: setting it stops
    training and keeps the partially trained copy. The thread only writes plain Python data
    here (no Streamlit calls), under ``lock``.
    """

    config: TrainConfig
    source_run_id: int | None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fraction: float = 0.0
    status: str = "starting"
    step_losses: list = field(default_factory=list)   # (step, loss)
    epochs: list = field(default_factory=list)        # {"epoch", "loss", "val_accuracy"}
    result: TrainResult | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    saved_run: Run | None = None
    thread: threading.Thread | None = None

    def start(self, module, dataset) -> "FinetuneJob":
        self.thread = threading.Thread(target=self._work, args=(module, dataset), daemon=True, name="finetune")
        self.thread.start()
        return self

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def _on_progress(self, progress: Progress) -> None:
        with self.lock:
            self.fraction = progress.fraction
            step = (progress.epoch - 1) * progress.steps_per_epoch + progress.step
            if progress.metric is None:
                self.step_losses.append((step, progress.loss))
                self.status = f"epoch {progress.epoch}/{progress.epochs}, step {progress.step}/{progress.steps_per_epoch}"
            else:
                self.epochs.append({"epoch": progress.epoch, "step": step, "loss": progress.loss,
                                    "val_accuracy": progress.metric})

    def _work(self, module, dataset) -> None:
        try:
            result = train(module, dataset, self.config, progress=self._on_progress, cancel=self.cancel)
        except ExplorerError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown to the user instead of dying silently in a thread
            self.error = f"Fine-tuning failed unexpectedly: {type(exc).__name__}: {exc}"
        else:
            self.result = result


def fmt_int(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def fmt_pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def fmt_bytes(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


__all__ = ["ExplorerError"]
