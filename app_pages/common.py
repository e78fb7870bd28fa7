"""What every page shares: cached base models and datasets, per-session state, small helpers.

Not a page (app.py does not list it). Objects returned by the ``st.cache_resource``
functions are shared by every browser session and are never modified: pruning and
training always work on copies (`explorer.pipeline.apply` and `explorer.train.train`
copy). Everything that belongs to one user lives in ``st.session_state`` under the keys
below.
"""
from __future__ import annotations

import dataclasses
import time

import streamlit as st

from explorer import baselines, blocks, figures, hf, jobs, lean, pipeline, tasks
from explorer.recipe import Recipe
from explorer.models import ZOO
from explorer.specs import MeasureSpec, ModelSpec, PlanSpec, ScoringSpec
from explorer.store import Run, RunStore, StoreError
from explorer.data import Dataset, load_dataset
from explorer.errors import ExplorerError

# st.session_state keys (one place, so pages agree on them)
MODEL = "current_model"        # dict: module, label, arch, dataset (Dataset), source, spec (ModelSpec), base_accuracy,
#                                task ({name, measure, base, higher_is_better}), key, origin
PREPARED = "prepared_cache"    # {(model key, ScoringSpec): pipeline.Prepared}
PRUNED = "pruned_result"       # dict: module, recipe (Recipe), plan, metrics, run_id, model_key, run_name, unsaved
#                                (run_id None and unsaved the store's one line naming the kept file, when it refused)
FINETUNE_JOB = "finetune_job"  # the fine-tune's background job
RECIPE = "recipe"              # the session's Recipe: the model's spec plus the Prune page's choices

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
    """The zoo model's baseline: from disk, or trained in a background job with a progress bar and a Cancel
    button (the bar shows from the first second, while the data loads).

    The training runs outside ``st.cache_resource`` (whose replay cannot update a progress bar created
    outside it); the cached call then reads the weights from disk. A cancelled training keeps the partly
    trained model for this session only (``path`` None: never cached, never shared).
    """
    bar = st.progress(0.0, text=f"Loading {dataset_name} for the {model_name} baseline ...")
    data = shared_dataset(dataset_name)
    config = baselines.default_config(model_name, dataset_name, train_size=len(data.y_train))
    if baselines.is_cached(model_name, dataset_name, config):
        bar.empty()
        return shared_baseline(model_name, dataset_name)
    bar.empty()
    job = st.session_state.get(BASELINE_JOB)
    if job is None or job.meta.get("pair") != (model_name, dataset_name):  # a rerun follows the same training
        def work(context: jobs.JobContext) -> baselines.Baseline:
            def report(progress) -> None:
                context.report(progress.fraction, f"epoch {progress.epoch}/{progress.epochs}, loss {progress.loss:.3f}")
            return baselines.baseline(model_name, data, config=config, progress=report, cancel=context.cancel)
        job = st.session_state[BASELINE_JOB] = jobs.start(work, name="Training the baseline",
                                                          meta={"pair": (model_name, dataset_name)})
    if not follow_job(job, cancel_key="baseline_cancel", what=f"Training the {model_name} baseline on {dataset_name}"):
        st.stop()
    st.session_state.pop(BASELINE_JOB, None)
    if job.error is not None:
        raise ExplorerError(job.error)
    if job.cancelled:
        return dataclasses.replace(job.result, path=None)
    return dataclasses.replace(shared_baseline(model_name, dataset_name), from_cache=False,
                               train_seconds=job.result.train_seconds)  # said as trained, not as loaded


def current_model() -> dict | None:
    return st.session_state.get(MODEL)


@st.cache_resource(show_spinner=False, max_entries=4)
def shared_transformer(source: str) -> tuple:
    """A built-in transformer or ``hf:FOLDER`` on the built-in text, loaded once and shared (read-only).

    Returns ``(module, dataset, arch)``; loads through `pipeline.resolve_model`, the CLI's path. Its task
    value is `transformer_task`'s (a perplexity takes minutes on a 1 B model: the Model page shows its bar).
    """
    return pipeline.resolve_model(ModelSpec(source=source, data="text", baseline=False))


BASE_TASKS: dict[str, dict] = {}  # source -> the dense transformer's task on the built-in text, shared like the models


def transformer_task(source: str, module, dataset, progress=None) -> dict:
    """The dense model's task on the built-in text (`task_of`), measured once per server; ``progress(fraction,
    line)`` follows a perplexity batch by batch (and may raise to stop it: nothing is kept then)."""
    if source not in BASE_TASKS:
        BASE_TASKS[source] = task_of(module, dataset, progress=progress)
    return BASE_TASKS[source]


def transformer_entry(source: str) -> dict:
    """The session-model entry of a built-in transformer or ``hf:FOLDER`` on the built-in text (shared, cached)."""
    with st.spinner(f"Loading {source} and tokenising the built-in text (once per server; seconds) ..."):
        module, data, arch = shared_transformer(source)  # a cached one comes back at once
        task = transformer_task(source, module, data)
    return {"module": module, "label": source, "arch": arch, "dataset": data, "source": "transformer",
            "spec": ModelSpec(source=source, data="text", baseline=False),
            "base_accuracy": task["base"] if task["name"] == "accuracy" else None, "task": task,
            "key": f"transformer:{source}:text", "origin": transformer_origin(source, module)}


def transformer_origin(source: str, module) -> str:
    what = hf.BUILTIN.get(source, f"Hugging Face folder {source[3:]}").split(":")[0]
    task = module.task.replace('_', ' ')
    return f"{what}, {'an' if task[:1] in 'aeiou' else 'a'} {task} transformer, pruned as loaded"


# ---------------------------------------------------------------- the model's task metric
# What "good" means depends on the model (explorer.tasks): accuracy for a classifier on labelled data,
# perplexity for a language model, fidelity to the dense model otherwise. Pages show the model's own.
MEASURE_LABELS = figures.METRIC_LABELS


def accuracy_task(accuracy: float | None) -> dict:
    return {"name": "accuracy", "measure": "accuracy", "base": accuracy, "higher_is_better": True}


def task_of(module, dataset, base_accuracy: float | None = None, progress=None) -> dict:
    """``{name, measure, base, higher_is_better}`` of a dense model: its own value of its task metric.

    Fidelity of the dense model to itself is perfect by definition (`tasks.PERFECT`), so it costs nothing.
    """
    name = tasks.task_for(module, dataset)
    if name == "accuracy":
        if base_accuracy is None:
            base_accuracy = tasks.accuracy(module, dataset)
        return accuracy_task(base_accuracy)
    if name == "perplexity":  # on the token budget every pruned copy is measured on (MeasureSpec's default)
        budget = MeasureSpec().token_budget
        return {"name": name, "measure": name,
                "base": tasks.perplexity(module, dataset, max_tokens=budget, progress=progress),
                "higher_is_better": False, "eval_tokens": budget,
                "tokens": dict(zip(("scored", "total"), tasks.eval_tokens(dataset, "test", budget)))}
    measure = tasks.default_measure(module)
    return {"name": name, "measure": measure, "base": tasks.PERFECT[measure],
            "higher_is_better": tasks.HIGHER_IS_BETTER[measure]}


def model_task(model: dict) -> dict:
    """The task of a session-model entry (an entry made before tasks existed is an accuracy model)."""
    return model.get("task") or accuracy_task(model.get("base_accuracy"))


def require_accuracy_task(model: dict, what: str) -> None:
    """Stop a page that trains the model (``what`` says so) when the model is not judged by accuracy."""
    task = model_task(model)
    if task["name"] == "accuracy":
        return
    st.info(f"{what} and compares accuracy; **{model['label']}** is judged by {task_label(task)}. Load a zoo model "
            "(or a transformer classifier on a labelled text file) to use this page; Prune, Fine-tune (next-token "
            "loss, or distillation to the dense model) and Compare work with every model.", icon=":material/info:")
    st.page_link("app_pages/prune.py", label="Go to the Prune page", icon=":material/arrow_forward:")
    st.stop()


def task_label(task: dict) -> str:
    """'accuracy', 'perplexity', 'fidelity (top-1 agreement)', ..."""
    return MEASURE_LABELS.get(task.get("measure"), task.get("name", "accuracy"))


def tokens_help(task: dict) -> str:
    """' Scored on the first 1,020 of 8,607 test tokens; ...' for a perplexity that says how many it read, else ''."""
    if "tokens" not in task:
        return ""
    hint = "a recipe's measure.eval_tokens: 0 scores them all"
    return f" Scored {tasks.tokens_phrase(task['tokens'], hint=hint)}."


def fmt_task(task: dict, value) -> str:
    """A task value as people read it: accuracy and agreement in %, perplexity as a number, cosine / KL as decimals."""
    if value is None:
        return "-"
    measure = task.get("measure")
    if measure in ("accuracy", "top1"):
        return fmt_pct(value)
    if measure == "perplexity":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"
    return f"{value:.3f}"


def fmt_task_delta(task: dict, base, value) -> str | None:
    """Pruned minus base, in points for percentages."""
    if base is None or value is None:
        return None
    if task.get("measure") in ("accuracy", "top1"):
        return f"{100 * (value - base):+.1f} pts"
    return f"{value - base:+,.2f}" if task.get("measure") == "perplexity" else f"{value - base:+.3f}"


def zoo_entry(model_name: str, dataset_name: str) -> dict:
    """The session-model entry of a zoo model's trained baseline on a built-in dataset (trains it once)."""
    base = baseline_with_progress(model_name, dataset_name)
    origin = "loaded from the baseline cache" if base.from_cache else f"trained in {base.train_seconds:.1f} s" \
        if base.path is not None else f"training cancelled after {base.train_seconds:.1f} s: partly trained, not cached"
    return {"module": base.model, "label": model_name, "arch": model_name, "dataset": shared_dataset(dataset_name),
            "source": "zoo", "spec": ModelSpec(source=model_name, data=dataset_name, baseline=True),
            "base_accuracy": base.accuracy, "task": accuracy_task(base.accuracy),
            "key": f"zoo:{model_name}:{dataset_name}", "origin": origin}


def require_model() -> dict:
    """The session's model; a page opened without one loads the model its link names, else the default."""
    model = current_model()
    if model is None:
        restore_from_url()
        model = current_model()
    if model is None:
        with st.spinner(f"Loading the default model ({DEFAULT_MODEL[0]} on {DEFAULT_MODEL[1]}) ..."):
            set_model(zoo_entry(*DEFAULT_MODEL))
        model = current_model()
    return model


# ---------------------------------------------------------------- state in the URL
# A reload, a bookmark or a shared link opens a new browser session: the URL's query parameters
# carry what is needed to reopen the same view (a zoo model and dataset, or a stored run, and the
# Prune page's settings). Zoo models on built-in data and transformers (built-in or a server-side
# hf: folder) go in a link; uploaded files and factories do not (an uploaded text file is named, and
# the link reopens the transformer on the built-in text, saying so).
DEFAULT_MODEL = ("mlp", "digits")
PRUNE_URL_KEYS = {"structure": "prune_structure", "criterion": "prune_criterion", "scope": "prune_scope",
                  "sparsity": "prune_sparsity", "min_keep": "prune_min_keep", "calib": "prune_calib",
                  "nm": "prune_nm", "protect": "prune_protect",
                  "round_to": "prune_round_to"}  # overrides: prune_override_layers and one key each
ROUND_TO = (1, 8, 16, 32)  # the Prune page's kept-channel multiples (1: no rounding)
NM_PATTERNS = ("2:4", "4:8")  # the N:M patterns the Prune page offers
TRANSFORMER_FOLDER = "local Hugging Face folder"  # the Model page's choice for hf:FOLDER


def restore_from_url() -> None:
    """Once per browser session: load the model, Prune settings and pruned copy the link names.

    ``run=ID`` names a stored run: alone (a shared link) it gives the model and the settings; beside
    ``model=`` (the app's own links) the settings come from the link, and in both cases the run's pruned
    copy is reopened (`pipeline.reopen`), so Fine-tune, Compare and Deploy find it after a reload.
    Bad values are ignored.
    """
    if st.session_state.get("url_restored"):
        return
    _restore_from_url(st.query_params)
    st.session_state["url_restored"] = True  # not before: a rerun in the middle (a Cancel click) tries again


def _restore_from_url(params) -> None:
    """`restore_from_url`'s work: the run, the model, the Prune settings and the pruned copy a link names."""
    run = None
    if params.get("run"):
        try:
            run = RunStore().get(int(params["run"]))
            Recipe.from_dict(run.recipe)
        except ValueError:
            run = None
            st.warning(f"The link names run {params['run']!r}, which cannot be reopened here; showing the default.")
        except ExplorerError as exc:  # a deleted run, or a store that cannot be read (the message names it)
            run = None
            st.warning(f"The link names run {params['run']!r}, which cannot be reopened here: {exc} "
                       "Showing the default.")
    recipe = Recipe.from_dict(run.recipe) if run is not None else None
    from_link = params.get("model") is not None
    model_name = params.get("model") if from_link else recipe.model.source if recipe is not None else None
    if model_name is None:
        return
    transformer = model_name in hf.BUILTIN or model_name.startswith("hf:")
    dataset_name = (params.get("data") if from_link else recipe.model.data) or \
        (ZOO[model_name].default_dataset if model_name in ZOO else "text" if transformer else None)
    text_file = params.get("text_file") if from_link else recipe.model.data_file
    if transformer and dataset_name == "text":
        if not _restore_transformer(model_name, text_file):
            return
    elif model_name in ZOO and dataset_name in ZOO_DATASETS:
        try:
            set_model(zoo_entry(model_name, dataset_name))
        except ExplorerError as exc:
            st.error(str(exc))
            return
        st.session_state["zoo_model"], st.session_state["zoo_dataset"] = model_name, dataset_name
    else:
        st.warning(f"The link names {model_name!r} on {dataset_name!r}; only zoo models on built-in data and "
                   "transformers on text open from a link. Showing the default model.")
        return
    if not from_link:
        plan = recipe.plan
        settings = {"structure": recipe.scoring.structure, "criterion": recipe.scoring.criterion,
                    "scope": plan.scope, "sparsity": plan.sparsity, "min_keep": plan.min_keep,
                    "calib": recipe.scoring.calib_batches, "nm": recipe.scoring.nm, "round_to": plan.round_to,
                    "protect": list(plan.protect), "overrides": dict(plan.overrides)}
    else:
        settings = {name: params[name] for name in (*PRUNE_URL_KEYS, "protect", "overrides") if name in params}
    checked = _checked_prune_settings(settings)
    overrides = checked.pop("overrides", {})
    for name, value in checked.items():
        st.session_state[PRUNE_URL_KEYS[name]] = value
    if overrides:
        st.session_state["prune_override_layers"] = list(overrides)
        st.session_state.update({f"prune_override_{layer}": value for layer, value in overrides.items()})
    if run is not None:
        reopen_run(run, recipe)


def reopen_run(run: Run, recipe: Recipe) -> None:
    """Make the stored run's pruned copy the session's again (its weights file, else its recipe replayed)."""
    model = current_model()
    if model is None or (recipe.model.source, recipe.model.data) != (model["spec"].source, model["spec"].data) \
            or "params_nonzero" not in run.metrics:  # a recipe stored without its measurement: nothing to reopen
        return
    try:
        with st.spinner(f"Reopening the pruned copy of run {run.id} ..."):
            weights = RunStore().weights_path(run.id) if run.id is not None else None
            module = pipeline.reopen(model["module"], model["dataset"], recipe, weights)
    except ExplorerError as exc:
        st.warning(f"The pruned copy of run {run.id} could not be reopened ({exc}); apply the plan again on the "
                   "Prune page.")
        return
    st.session_state[PRUNED] = {"module": module, "recipe": recipe, "plan": dataclasses.asdict(recipe.plan),
                                "metrics": run.metrics,
                                "run_id": run.id, "model_key": model["key"], "run_name": run.name, "unsaved": None}


def _restore_transformer(source: str, text_file: str | None) -> bool:
    """Load the link's transformer on the built-in text; an uploaded text file cannot come back (one line says so)."""
    try:
        entry = transformer_entry(source)
    except ExplorerError as exc:
        st.warning(f"The link names {source!r}, which cannot be loaded here ({exc}); showing the default model.")
        return False
    set_model(entry)
    if text_file:
        st.info(f"The link's text file {text_file!r} was uploaded in another session and cannot be restored: "
                f"{source} is shown on the built-in English text. Upload the file again on the Model page.",
                icon=":material/info:")
    builtin = source in hf.BUILTIN
    st.session_state.update(model_source="Transformer", tf_model=source if builtin else TRANSFORMER_FOLDER,
                            tf_text="built-in English text")
    if not builtin:
        st.session_state["tf_folder"] = source[3:]
    return True


def _checked_prune_settings(settings: dict) -> dict:
    """The Prune settings among ``settings`` that are valid (a hand-edited link may hold anything)."""
    from explorer.criteria import CRITERIA
    from explorer.planner import SCOPES
    from explorer.specs import STRUCTURES

    checked = {}
    for name, allowed in (("structure", STRUCTURES), ("criterion", CRITERIA), ("scope", SCOPES), ("nm", NM_PATTERNS)):
        if settings.get(name) in allowed:
            checked[name] = settings[name]
    for name, low, high, kind in (("sparsity", 0.0, 1.0, float), ("min_keep", 0.0, 0.5, float),
                                  ("calib", 1, 16, int)):
        try:
            value = kind(settings[name])
        except (KeyError, TypeError, ValueError):
            continue
        if low <= value <= high:
            checked[name] = round(value, 2) if kind is float else value
    try:
        if int(settings["round_to"]) in ROUND_TO:
            checked["round_to"] = int(settings["round_to"])
    except (KeyError, TypeError, ValueError):
        pass
    protect = settings.get("protect")
    if isinstance(protect, str):
        protect = [name for name in protect.split(",") if name]
    if isinstance(protect, (list, tuple)) and all(isinstance(name, str) for name in protect):
        checked["protect"] = list(protect)
    overrides = settings.get("overrides")
    if isinstance(overrides, str):  # "layer:0.3,other:0.9", as sync_url writes it
        overrides = dict(item.rpartition(":")[::2] for item in overrides.split(",") if ":" in item)
    if isinstance(overrides, dict):
        kept = {}
        for layer, value in overrides.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if layer and 0.0 <= value <= 1.0:
                kept[str(layer)] = round(value, 2)
        if kept:
            checked["overrides"] = kept
    return checked


def sync_url() -> None:
    """Write the session's model and Prune settings into the URL (only what changed)."""
    model = current_model()
    wanted: dict[str, str] = {}
    if model is not None and model["source"] == "zoo" and model["dataset"].name in ZOO_DATASETS:
        wanted = {"model": model["arch"], "data": model["dataset"].name}
    elif model is not None and model["source"] == "transformer":
        wanted = {"model": model["spec"].source, "data": "text"}
        if model["spec"].data_file:
            wanted["text_file"] = model["spec"].data_file
    if wanted:
        recipe = st.session_state.get(RECIPE)
        if recipe is not None and recipe.model == model["spec"]:
            wanted.update(structure=recipe.scoring.structure, criterion=recipe.scoring.criterion,
                          scope=recipe.plan.scope, sparsity=f"{recipe.plan.sparsity:g}",
                          min_keep=f"{recipe.plan.min_keep:g}", calib=str(recipe.scoring.calib_batches))
            if recipe.scoring.structure == "nm":
                wanted["nm"] = recipe.scoring.nm
            if recipe.plan.round_to > 1:
                wanted["round_to"] = str(recipe.plan.round_to)
            if recipe.plan.protect:
                wanted["protect"] = ",".join(recipe.plan.protect)
            if recipe.plan.overrides:
                wanted["overrides"] = ",".join(f"{layer}:{value:g}" for layer, value in recipe.plan.overrides.items())
        pruned = st.session_state.get(PRUNED)
        if pruned is not None and pruned.get("model_key") == model["key"] and pruned.get("run_id") is not None:
            wanted["run"] = str(pruned["run_id"])  # a reload reopens the pruned copy from its run
    if dict(st.query_params) != wanted:
        st.query_params.from_dict(wanted)


def explain(markdown: str) -> None:
    """The page's 'What am I looking at?' expander."""
    with st.expander("What am I looking at?"):
        st.markdown(markdown)


def lean_for(model: dict, scoring: ScoringSpec, plan: PlanSpec) -> bool:
    """Whether the session's model is pruned the lean way under these settings (`explorer.lean`): a causal LM,
    magnitude / Wanda / SparseGPT, unstructured or N:M, local scope (global too for magnitude without
    min_keep). Then nothing is scored up front and Apply prunes one copy, layer by layer or block by block."""
    return lean.refusal(model["module"], scoring, plan) is None


def lean_reason(model: dict, scoring: ScoringSpec, plan: PlanSpec) -> str | None:
    """Why a causal LM's plan takes the general path (None when it is lean, or the model is no causal LM)."""
    if not blocks.is_causal_lm(model["module"]) or scoring.structure not in ("unstructured", "nm"):
        return None
    return lean.refusal(model["module"], scoring, plan)


GENERAL_PATH_COPIES = 10  # the general path holds about this many copies of an LLM's weights (scores, sort keys,
#                           masked and folded copies: issue 22's 124 M figures); the Prune page refuses it beyond memory


def memory_available() -> int | None:
    """Bytes the system can still give (``MemAvailable`` of /proc/meminfo), None where that is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def prepared_for(model: dict, scoring: ScoringSpec, *, cancel_key: str = "scoring_cancel",
                 lean: bool = False) -> pipeline.Prepared | None:
    """Scores sorted once per (model, ScoringSpec), kept for this session only; None when the user cancelled.

    The scoring runs as a background job with a progress bar and a Cancel button (`follow_job`; a transformer
    takes seconds to tens of seconds). A cancel keeps nothing of it (scores are all or nothing): the caller goes
    back to what it showed before. A rerun with other settings cancels a scoring it no longer needs.
    ``lean=True`` (`lean_for`) prepares without scores (`pipeline.prepare(lean=True)`: each layer's size, the
    calibration text; a global magnitude cut from histograms of the weights) and drops the model's full
    preparations from the session: they hold a score for every weight, several times the model's memory.
    """
    cache = st.session_state.setdefault(PREPARED, {})
    key = (model["key"], scoring, "lean") if lean else (model["key"], scoring)
    if lean:
        for old in [old for old in cache if old[0] == model["key"] and len(old) == 2]:
            del cache[old]
    if key in cache:
        return cache[key]
    job = st.session_state.get(PREPARE_JOB)
    if job is None or job.meta.get("key") != key:
        if job is not None:  # settings changed while it scored: stop it before scoring the shared model again
            job.cancel.set()  # (calibration hooks of two scorings on one module would see each other's batches)
            job.wait(60)
        module, dataset = model["module"], model["dataset"]
        job = st.session_state[PREPARE_JOB] = jobs.start(
            lambda context: pipeline.prepare(module, scoring, dataset=dataset, cancel=context.cancel, lean=lean,
                                             progress=lambda fraction, line: context.report(fraction, line)),
            name="Scoring", meta={"key": key})
    if not follow_job(job, cancel_key=cancel_key, what=f"Scoring {scoring.structure} units by {scoring.criterion}"):
        st.stop()
    st.session_state.pop(PREPARE_JOB, None)
    if job.result is not None:  # finished, even if a Cancel came too late to stop it
        cache[key] = job.result
        return job.result
    if job.cancelled:
        return None
    raise ExplorerError(job.error)


def session_recipe(model: dict) -> Recipe:
    """The session's Recipe for ``model``: what the Prune page last chose, or the defaults."""
    recipe = st.session_state.get(RECIPE)
    if recipe is None or recipe.model != model["spec"]:
        recipe = Recipe(model=model["spec"])
    return recipe


def set_model(entry: dict) -> None:
    """Make ``entry`` the session's model and forget everything derived from the previous one."""
    st.session_state[MODEL] = entry
    for key in [PREPARED, PRUNED, RECIPE, *(k for k in st.session_state if str(k).startswith("prune_"))]:
        st.session_state.pop(key, None)
    for key in (FINETUNE_JOB, APPLY_JOB, PREPARE_JOB):
        job = st.session_state.pop(key, None)
        if job is not None:
            job.cancel.set()


def measure_and_save(model: dict, pruned_module, recipe: Recipe, *, stage: int = 0, history=None, name: str = "",
                     outcome: dict | None = None) -> tuple[Run, StoreError | None]:
    """Measure a pruned copy next to its base (accuracy, FLOPs, size, latency) and store it as a run.

    The measurement is `pipeline.measure_run` with the recipe's MeasureSpec, the very call the
    CLI makes; `save_measured` stores it. Returns ``(run, None)`` once stored, or ``(run, error)`` when the
    store refused it (see `save_measured`).
    """
    with st.status(f"Measuring {task_label(model_task(model))}, parameters, FLOPs, size and latency (base and pruned, "
                   "same batch) ...", expanded=False) as status:
        metrics = measure(model, pruned_module, recipe)
        status.update(label="Measured.", state="complete")
    return save_measured(model, pruned_module, recipe, metrics, stage=stage, history=history, name=name,
                         outcome=outcome)


def measure(model: dict, pruned_module, recipe: Recipe, progress=None, cancel=None) -> dict:
    """`pipeline.measure_run` of a pruned copy against the session model's base (its task value reused)."""
    task = model_task(model)
    return pipeline.measure_run(model["module"], pruned_module, model["dataset"], recipe.measure,
                                base_accuracy=model["base_accuracy"],
                                base_task_value=None if task["name"] == "accuracy" or (
                                    task["name"] == "perplexity"  # scored on other tokens: measured again
                                    and task.get("eval_tokens") != recipe.measure.token_budget) else task["base"],
                                progress=progress, cancel=cancel)


def save_measured(model: dict, pruned_module, recipe: Recipe, metrics: dict, *, stage: int = 0, history=None,
                  name: str = "", outcome: dict | None = None) -> tuple[Run, StoreError | None]:
    """Store a measured pruned copy as a run; safe to call from a background job (no Streamlit call).

    The run keeps the full Recipe; ``outcome`` adds facts the recipe cannot know
    (e.g. how many fine-tune epochs ran before a cancel). Weights are stored only when the
    architecture is known (zoo name, factory, built-in transformer or hf: folder), since a stored file is
    rebuilt from it; a transformer with heads removed comes back with its head counts.

    Returns ``(run, None)`` once stored. When the store refuses it, the measurement is not lost:
    ``(run, error)``, the run's id None (or set, when only its weights were refused) and the
    StoreError's one line naming the file that keeps it (``error.kept``), so a page shows the line
    and goes on with the measured copy.
    """
    data = model["dataset"]
    settings = {"arch": model["arch"], "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                "model_source": model["source"], **(outcome or {})}
    run = Run.from_recipe(recipe, model_name=model["label"], dataset=data.name, settings=settings, metrics=metrics,
                          history=list(history or []), name=name, stage=stage)
    try:
        return RunStore().save(run, pruned_module if model["arch"] else None), None
    except StoreError as refused:
        if not run.name:
            run.name = f"unsaved run ({refused.kept.name})" if refused.kept is not None else "unsaved run"
        return run, refused


# ---------------------------------------------------------------- long steps: progress and Cancel
BASELINE_JOB = "baseline_job"  # a zoo baseline training for the first time
PREPARE_JOB = "prepare_job"  # scoring for a new (model, ScoringSpec): `prepared_for`
APPLY_JOB = "apply_job"  # the Prune page's Apply (prune a copy, measure it, save the run) running in the background
JOB_WAIT_S = 3600.0  # how long one script run follows a job; tests lower it to see (and press) the Cancel button
CANCEL_LABEL = "Cancel (keep what is done)"


class ApplyCancelled(ExplorerError):
    """Apply's pruning stopped at a Cancel: the copy is dropped, nothing is kept, the loaded model is untouched."""


def start_apply(model: dict, prepared, plan, recipe: Recipe) -> jobs.Job:
    """Apply as a background job: prune a copy, measure it stage by stage, save the run.

    Its result is ``(pruned module, run, StoreError or None)``, or None when a Cancel came while pruning: the
    pruning stops at its next layer or block (a lean or block-by-block prune reports each), the copy is
    dropped and nothing is saved. A cancel during the measurement keeps the pruned copy and the stages done
    (the run's ``metrics["cancelled"]`` names the stage skipped); a pruning that reports no steps (masks of a
    small model, channels) finishes, then only the counts are measured.
    A lean preparation (a causal LM, `explorer.lean`) prunes one copy of the model in place, layer by layer or
    block by block with plain zeros; pruning is then most of the work, so it gets half the bar.
    """
    share, stopped = (0.5 if prepared.lean else 0.1), {}

    def work(context: jobs.JobContext):
        def pruning(fraction: float, line: str) -> None:
            if context.cancel.is_set():  # raised inside the prune: the copy is dropped with everything on it
                raise ApplyCancelled(f"Apply cancelled at: {line}")
            context.report(share * fraction, line)

        context.report(0.0, f"Pruning a copy ({recipe.scoring.structure}, {recipe.scoring.criterion}"
                            f"{', lean: no scores kept' if prepared.lean else ''}) ...")
        try:  # block by block with sequential calibration (and always on the lean path)
            pruned_module = pipeline.apply(model["module"], prepared, plan, progress=pruning)
        except ApplyCancelled as stop:
            stopped["at"] = str(stop)
            return None
        metrics = measure(model, pruned_module, recipe, cancel=context.cancel,
                          progress=lambda fraction, line: context.report(share + (0.95 - share) * fraction, line))
        context.report(0.97, "Saving the run ...")
        return (pruned_module, *save_measured(model, pruned_module, recipe, metrics))
    return jobs.start(work, name="Apply", meta={"stopped": stopped})


def _bar_and_cancel(job: jobs.Job, *, what: str, cancel_key: str, cancel_label: str):
    """The one drawing of a running job: its Cancel button (the click sets the job's cancel flag) and its bar."""
    st.button(cancel_label, key=cancel_key, on_click=job.cancel.set, disabled=job.cancelled, icon=":material/stop:")
    return st.progress(job.fraction, text=_bar_text(job, what))


def _bar_text(job: jobs.Job, what: str) -> str:
    return f"{what}: {job.status}" + (" (cancelling)" if job.cancelled and not job.done else "")


def follow_job(job: jobs.Job, *, cancel_key: str, what: str, cancel_label: str = CANCEL_LABEL) -> bool:
    """Show a running job's progress bar and a Cancel button until it is done; True when it is.

    For a step the page cannot go on without (scores, a baseline, Apply): the script waits here, redrawing
    the bar; a click on Cancel reruns the script (the click sets the job's cancel flag), and the rerun
    follows the same job again, so nothing is started twice. `live_job` is the same bar and button for a job
    the page shows beside everything else.
    """
    box = st.empty()
    with box.container():
        bar = _bar_and_cancel(job, what=what, cancel_key=cancel_key, cancel_label=cancel_label)
    deadline = time.monotonic() + JOB_WAIT_S
    while not job.wait(0.25) and time.monotonic() < deadline:
        bar.progress(job.fraction, text=_bar_text(job, what))
    if job.done:
        box.empty()
    return job.done


def live_job(job_key: str, *, what: str, cancel_key: str, cancel_label: str = CANCEL_LABEL, extra=None) -> None:
    """The progress bar and Cancel button of the job in ``st.session_state[job_key]``, redrawn twice a second
    by a fragment while the rest of the page stays usable (Fine-tune, Deploy); when the job ends, one full
    rerun hands its result to the page. ``extra(job)`` draws more inside the fragment (a live curve).
    """
    job = st.session_state.get(job_key)
    running = job is not None and not job.done

    @st.fragment(run_every=0.5 if running else None)
    def live() -> None:
        current = st.session_state.get(job_key)
        if current is None:
            return
        if not current.done:
            _bar_and_cancel(current, what=what, cancel_key=cancel_key, cancel_label=cancel_label)
        if extra is not None:
            extra(current)
        if current.done and running:
            st.rerun(scope="app")

    live()


def fmt_int(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def fmt_count(value) -> str:
    """A count short enough for a headline card: exact up to 999,999, then '5.38 M', '1.24 G'."""
    if value is None:
        return "-"
    value = int(value)
    for limit, unit in ((10 ** 9, "G"), (10 ** 6, "M")):
        if abs(value) >= limit:
            return f"{value / limit:.2f} {unit}"
    return f"{value:,}"


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
