"""The pruning chain in four calls: prepare -> preview -> apply -> measure_run.

This is the seam the UI, the CLI and recipes share, so they produce the same numbers. Each
step takes one part of a Recipe (`explorer.specs`): `resolve_model` a ModelSpec, `prepare` a
ScoringSpec, `preview` a PlanSpec, `measure_run` a MeasureSpec.

* `prepare` scores a model once for a (structure, criterion) and sorts the scores
  (seconds, at most); for channel pruning it also finds the coupled channel groups.
* `preview` turns a sparsity / scope into a Plan in milliseconds, and `estimate` gives
  live parameter and FLOP counts for it, so a slider never re-prunes the model.
* `apply` makes the pruned copy: masks for unstructured, physical removal for channels.
* `measure_run` puts accuracy, theoretical and measured numbers of base and pruned side by side.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from explorer import blocks, compat, criteria, gqa, heads, hf, llm, masking, measure, mha, planner, semistructured, structural, tasks, text
from explorer import lean as lean_path
from explorer.data import Dataset, load_dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model, prunable_counts, prunable_layers, weight_of
from explorer.models import ZOO, load_model, read_saved_metadata
from explorer.specs import STRUCTURES, MeasureSpec, ModelSpec, PlanSpec, ScoringSpec  # noqa: F401 - STRUCTURES re-exported
from explorer.train import TrainConfig, evaluate, train


@dataclass
class Prepared:
    """Scores of one model under one (structure, criterion), sorted once for instant plans.

    ``units`` are weights (unstructured) or channel groups (channel, keyed by the group's
    root layer). ``kept_dense`` are prunable layers left out of the ranking on purpose (outside a
    causal LM's blocks, tied to another layer): dense in every plan, and protecting them is a no-op. ``layer_flops`` are the dense FLOPs of each prunable layer, used by
    `estimate`. Keep one per (model, structure, criterion) and reuse it for every slider move.
    ``lean`` preparations (`explorer.lean`) hold no scores and no order, only each layer's size: they
    plan local and N:M cuts, and `apply` finds each layer's pruned weights when it prunes it.
    """

    structure: str
    criterion: str
    scores: dict[str, torch.Tensor]
    ranking: planner.Ranking
    example_input: torch.Tensor
    groups: list[structural.ChannelGroup] = field(default_factory=list)
    attention: dict[str, heads.HeadInfo] = field(default_factory=dict)
    nm: tuple[int, int] | None = None
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""
    kept_dense: tuple[str, ...] = ()
    sequential: bool = False
    lean: bool = False
    calib: list = field(default_factory=list)
    layer_kinds: dict[str, str] = field(default_factory=dict)
    layer_params: dict[str, int] = field(default_factory=dict)
    layer_flops: dict[str, int] = field(default_factory=dict)
    params_total: int = 0
    flops_dense: int = 0
    seconds: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        return self.ranking.names


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
        return "depthwise conv2d"
    return type(module).__name__.lower()


def _resolve_transformer(spec: ModelSpec, seed: int) -> tuple[nn.Module, Dataset, str]:
    """A built-in transformer or a local Hugging Face folder, with text tokenised by its own tokenizer."""
    if spec.data not in (None, "text"):
        raise ExplorerError(f"'{spec.source}' takes token ids: use --data text (optionally --data-file FILE), "
                            f"not '{spec.data}'.")
    bundle = hf.load_hf(spec.source[3:]) if spec.source.startswith("hf:") else hf.builtin(spec.source, seed=seed)
    dataset = text.text_dataset(bundle.tokenizer, path=spec.data_file, seq_len=bundle.model.seq_len, seed=seed)
    if (bundle.task == "classification" and spec.source in hf.BUILTIN and dataset.info.get("labelled")
            and dataset.num_classes != bundle.model.hf.config.num_labels):
        bundle = hf.builtin(spec.source, seed=seed, num_labels=dataset.num_classes)
    model = bundle.model.eval()
    tasks.check_forward(model, dataset, f"'{spec.source}'")
    if spec.train_epochs:
        raise ExplorerError("train_epochs is for image / sequence classifiers; a transformer is pruned as loaded.")
    return model, dataset, spec.source


def _training_report(progress: Callable[[float, str], None] | None, label: str):
    """A `train.Progress` callback that hands ``progress(fraction, 'label: epoch i/n')`` on (None stays None)."""
    if progress is None:
        return None
    return lambda step: progress(step.fraction, f"{label}: epoch {step.epoch}/{step.epochs}")


def resolve_model(spec: ModelSpec, *, seed: int = 0,
                  progress: Callable[[float, str], None] | None = None) -> tuple[torch.nn.Module, Dataset, str]:
    """Load the dataset and the model a ModelSpec names; returns (model in eval mode, dataset, architecture).

    ``baseline`` applies to zoo names: their trained, cached baseline replaces fresh weights.
    ``train_epochs`` trains the loaded model briefly first (a factory gives untrained weights).
    ``progress(fraction, text)`` follows a training that has to happen here (a first baseline, those epochs).
    """
    spec.validate()
    source = spec.source
    if source.startswith("hf:") or source in hf.BUILTIN:
        return _resolve_transformer(spec, seed)
    if spec.data == "text":
        raise ExplorerError(f"--data text needs a transformer with its tokenizer: hf:FOLDER or one of "
                            f"{', '.join(hf.BUILTIN)}; '{source}' has none.")
    saved = None
    if source not in ZOO and Path(source).is_file():
        try:
            saved = read_saved_metadata(source)
        except ExplorerError:
            saved = None
    data_name = spec.data or (ZOO[source].default_dataset if source in ZOO else None) or "digits"
    dataset = load_dataset(data_name, seed=seed, path=spec.data_file)
    if saved is not None and tuple(saved["input_shape"]) != dataset.input_shape:
        raise ExplorerError(f"'{source}' was saved for inputs {tuple(saved['input_shape'])}, but '{dataset.name}' "
                            f"gives {dataset.input_shape}; pass the matching --data.")
    if spec.baseline and source in ZOO and spec.weights is None:
        from explorer.baselines import baseline

        model = baseline(source, dataset, seed=seed,
                         progress=_training_report(progress, f"training the {source} baseline")).model
    else:
        torch.manual_seed(seed)
        model = load_model(source, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                           weights=spec.weights, arch=spec.arch, trust_pickle=spec.trust_pickle)
    tasks.check_forward(model.eval(), dataset, f"'{source}'")
    if spec.train_epochs:
        model = train(model.eval(), dataset, TrainConfig(epochs=spec.train_epochs, lr=1e-3, seed=seed),
                      progress=_training_report(progress, "training")).model.cpu()
    return model.eval(), dataset, saved["arch"] if saved is not None else (spec.arch or source)


def calibration(model: nn.Module, dataset: Dataset, scoring: ScoringSpec, *, seed: int = 0) -> list:
    """The calibration batches a ScoringSpec asks for: shaped text (`explorer.text.calibration`) or the dataset's.

    Shaped text takes ``calib_samples`` (default ``calib_batches x calib_batch_size``) sequences of
    ``calib_seqlen`` tokens (default the dataset's length), which must fit the model's positions.
    """
    if not scoring.shaped_text:
        return dataset.calibration(scoring.calib_batches, scoring.calib_batch_size, seed=seed)
    seq_len = scoring.calib_seqlen or int(dataset.info.get("seq_len") or dataset.input_shape[0])
    limit = hf.max_positions(model.hf.config) if isinstance(model, hf.TokenModel) else None
    if limit and seq_len > limit:
        raise ExplorerError(f"Calibration sequences of {seq_len:,} tokens are longer than the model's {limit:,} "
                            "positions; lower --calib-seqlen.")
    samples = scoring.calib_samples or scoring.calib_batches * scoring.calib_batch_size
    return text.calibration(dataset, samples, seq_len, scoring.calib_mode, seed=seed)


class ScoringCancelled(ExplorerError):
    """`prepare` stopped because its cancel flag was set: nothing was scored, nothing is kept."""


def _stages(progress: Callable[[float, str], None] | None, cancel) -> Callable[[float, str], None]:
    """A progress callback that first raises `ScoringCancelled` once ``cancel`` (a threading.Event) is set."""
    def report(fraction: float, text: str) -> None:
        if cancel is not None and cancel.is_set():
            raise ScoringCancelled("Scoring cancelled; nothing was scored.")
        if progress is not None:
            progress(fraction, text)
    return report


def prepare(model: nn.Module, scoring: ScoringSpec, *, dataset: Dataset | None = None, seed: int = 0,
            example_input: torch.Tensor | None = None,
            progress: Callable[[float, str], None] | None = None, lean: bool = False, cancel=None) -> Prepared:
    """Score ``model`` and sort the scores; the slow step, done once per ScoringSpec.

    On a model that already carries masks, the pruned units count as pruned whatever the
    criterion says of them (they rank below every live unit), so a plan at a higher sparsity
    keeps them pruned and adds exactly the difference: iterative pruning with any criterion.
    ``progress(fraction, text)`` follows the stages: the criterion's scoring (to 0.8, batch by batch),
    the N:M pattern (layer by layer) and the ranking. ``cancel`` (a threading.Event) stops it at the
    next report with `ScoringCancelled`: scores are all or nothing, so a caller keeps what it had before.
    ``lean=True`` (where `explorer.lean.refusal` is None) scores nothing here: the preparation plans
    local and N:M cuts from the layers' sizes, and `apply` scores and prunes layer by layer (block by
    block with calibration), for a model too large for every weight's score and sort key.
    """
    report = _stages(progress, cancel)
    scoring_progress = lambda fraction, text: report(0.8 * fraction, text)  # noqa: E731 - the criterion's share
    scoring.validate()
    structure, criterion = scoring.structure, scoring.criterion
    if (reason := compat.refusal(model, structure, scoring.nm_pair)) is not None:
        raise ExplorerError(reason)
    started = time.perf_counter()
    if example_input is None:
        if dataset is None:
            raise ExplorerError("Preparing a plan needs a dataset or an example input.")
        example_input = dataset.example_input(1)
    traced: list[structural.ChannelGroup] = []
    if structure == "channel" or (structure == "head" and not gqa.attentions(model)):
        if structure == "head":
            heads.check_supported(model)
        # first, before calibration or scoring: a model torch-pruning cannot trace (or not within
        # `deadline.trace_limit`) is refused in one line before any other work
        report(0.0, "tracing the coupled channels (torch-pruning)")  # one call: a cancel stops after it
        traced = structural.channel_groups(model, example_input)
    needs_data = criteria.CRITERIA[criterion].needs_data
    calib = None
    if needs_data:
        if dataset is None:
            raise ExplorerError(f"Criterion '{criterion}' needs data: choose a dataset, or a data-free "
                                "criterion (magnitude, random, bn_scale, synflow).")
        calib = calibration(model, dataset, scoring, seed=seed)
    input_shape = tuple(example_input.shape[1:])
    layers = dict(prunable_layers(model))
    model_flops = measure.remembered(model, ("flops", tuple(example_input.shape), example_input.dtype),
                                     lambda: measure.flops(model, example_input))  # the base's, reused while unchanged
    prepared_groups: list[structural.ChannelGroup] = []
    attention: dict[str, heads.HeadInfo] = {}
    hessians: dict[str, torch.Tensor] = {}
    nm, notes = None, []
    kept_dense: list[str] = []
    if lean and (reason := lean_path.refusal(model, scoring)) is not None:
        raise ExplorerError(f"The lean path cannot prune this: {reason}.")
    if structure in ("unstructured", "nm"):
        chosen = None
        if blocks.is_causal_lm(model) and not scoring.include_head:
            kept_dense = blocks.outside_blocks(model, layers)
            chosen = [name for name in layers if name not in kept_dense]
            if kept_dense:
                notes.append(f"Kept dense as the Wanda / SparseGPT papers do: {', '.join(kept_dense)} (outside the "
                             "transformer blocks; include_head / --include-head prunes it too).")
        if lean:
            return _prepare_lean(model, scoring, layers, chosen, kept_dense, notes, calib, example_input, model_flops,
                                 started)
        if criterion == "sparsegpt":  # the Hessians are kept: Apply rebuilds the kept weights with them
            hessians = llm.hessians(model, calib, layers=chosen, progress=scoring_progress)
            scores = llm.sparsegpt_scores(model, hessians)
            unreached = [name for name in (chosen or layers) if name not in scores]
            tied = [name for name in scores if llm.tied_with(model, name)]
            scores = {name: score for name, score in scores.items() if name not in tied}
            kept_dense += unreached + tied
            if unreached:
                notes.append(f"Kept dense: {', '.join(unreached)} (the calibration data never reaches them, "
                             "or they are grouped convs).")
            if tied:
                notes.append(f"Kept dense: {', '.join(tied)} (its weight is tied to another layer, so SparseGPT's "
                             "updates would change both).")
        else:
            scores = criteria.weight_scores(model, criterion, calib, seed=seed, input_shape=input_shape,
                                            progress=scoring_progress, layers=chosen)
        if structure == "nm":
            nm = scoring.nm_pair
            misfits = llm.nm_misfits(scores, nm[1])
            fitting = [name for name in scores if name not in misfits]
            for done, name in enumerate(fitting):  # about 0.2 s a layer of MiniLM: report (and stop) between layers
                report(0.8 + 0.15 * done / max(1, len(fitting)), f"{nm[0]}:{nm[1]} pattern: {name}")
                scores[name] = llm.nm_scores({name: scores[name]}, *nm)[name]
            scores = {name: scores[name] for name in fitting}
            kept_dense += misfits
            if misfits:
                notes.append(f"Kept dense: {', '.join(misfits)} (inputs per output not a multiple of {nm[1]}, "
                             f"so no {nm[0]}:{nm[1]} pattern fits).")
            if not scores:
                raise ExplorerError(f"No layer of this model fits a {nm[0]}:{nm[1]} pattern; use unstructured.")
    elif structure == "head" and gqa.attentions(model):  # LLaMA-style: key/value groups, no trace needed
        prepared_groups = gqa.kv_groups(model)
        channel = criteria.channel_scores(model, criterion, calib, norm=scoring.norm, seed=seed,
                                          input_shape=input_shape, progress=scoring_progress)
        scores = gqa.group_scores(prepared_groups, channel)
    else:
        prepared_groups = traced
        head_groups, packed = mha.head_groups(model) if structure == "head" else ([], {})
        if not prepared_groups and not head_groups:
            raise ExplorerError("This model has no channels that can be removed (only the classifier's "
                                "outputs, which are never pruned). Use unstructured pruning.")
        channel = criteria.channel_scores(model, criterion, calib, norm=scoring.norm, seed=seed,
                                          input_shape=input_shape, progress=scoring_progress)
        if structure == "head":
            unscored = [name for name in packed if name not in channel]
            if unscored:
                raise ExplorerError(f"Criterion '{criterion}' gives no score to the heads of '{unscored[0]}' "
                                    "(nn.MultiheadAttention): choose magnitude, taylor, gradient, snip or wanda.")
            attention = {**heads.attention_of(model, prepared_groups), **packed}
            if not attention:
                raise ExplorerError("This model has no attention heads that can be pruned (no "
                                    "nn.MultiheadAttention, no module with num_attention_heads and "
                                    "attention_head_size); use --structure channel.")
            prepared_groups = heads.units_of_head_structure(prepared_groups, attention) + head_groups
        scores = structural.group_scores(model, prepared_groups, channel)
        if structure == "head":
            scores = heads.head_scores(scores, attention)
    report(0.95, "ranking the scores")
    ranking = planner.prepare(scores, kept=masking.kept_units(masking.current_masks(model), scores))
    report(1.0, "ranked")
    return Prepared(
        structure=structure, criterion=criterion, scores=scores, ranking=ranking, example_input=example_input,
        groups=prepared_groups, attention=attention, nm=nm, hessians=hessians, note=" ".join(notes),
        kept_dense=tuple(kept_dense), sequential=scoring.sequential, calib=calib if scoring.sequential else [],
        layer_kinds={name: _layer_kind(module) for name, module in layers.items()},
        layer_params={name: weight_of(module).numel() for name, module in layers.items()},
        layer_flops={name: int(model_flops["per_layer"].get(name, {}).get("dense", 0)) for name in layers},
        params_total=measure.count_params(model)["total"],
        flops_dense=int(model_flops["dense"]),
        seconds=time.perf_counter() - started,
    )


def _prepare_lean(model: nn.Module, scoring: ScoringSpec, layers: dict, chosen: list[str], kept_dense: list[str],
                  notes: list[str], calib, example_input: torch.Tensor, model_flops: dict, started: float) -> Prepared:
    """`prepare` without scores (`explorer.lean`): the chosen layers' sizes, N:M misfits kept dense."""
    nm = scoring.nm_pair if scoring.structure == "nm" else None
    weights = {name: weight_of(layers[name]) for name in chosen}
    if nm is not None:
        misfits = llm.nm_misfits(weights, nm[1])
        weights = {name: weight for name, weight in weights.items() if name not in misfits}
        kept_dense = kept_dense + misfits
        if misfits:
            notes.append(f"Kept dense: {', '.join(misfits)} (inputs per output not a multiple of {nm[1]}, "
                         f"so no {nm[0]}:{nm[1]} pattern fits).")
        if not weights:
            raise ExplorerError(f"No layer of this model fits a {nm[0]}:{nm[1]} pattern; use unstructured.")
    return Prepared(
        structure=scoring.structure, criterion=scoring.criterion, scores={},
        ranking=lean_path.sizes_only(list(weights), [tuple(weight.shape) for weight in weights.values()],
                                     lean_path.MagnitudeOrder({name: layers[name] for name in weights})
                                     if scoring.criterion == "magnitude" and nm is None else None),
        example_input=example_input, nm=nm, note=" ".join(notes), kept_dense=tuple(kept_dense),
        sequential=scoring.sequential, lean=True, calib=calib or [],
        layer_kinds={name: _layer_kind(module) for name, module in layers.items()},
        layer_params={name: weight_of(module).numel() for name, module in layers.items()},
        layer_flops={name: int(model_flops["per_layer"].get(name, {}).get("dense", 0)) for name in layers},
        params_total=measure.count_params(model)["total"], flops_dense=int(model_flops["dense"]),
        seconds=time.perf_counter() - started)


def nm_sparsity(nm: tuple[int, int]) -> float:
    """The sparsity an N:M pattern fixes: (M - N) / M."""
    return (nm[1] - nm[0]) / nm[1]


def preview(prepared: Prepared, spec: PlanSpec) -> planner.Plan:
    """The Plan for a PlanSpec: milliseconds, no model touched.

    N:M fixes the sparsity at (M - N) / M in every layer it fits, whatever ``spec.sparsity`` says;
    ``spec.round_to`` (channel structure) rounds each layer's kept channels to a multiple (`planner.round_kept`);
    protected layers stay dense, and protecting a layer that `prepare` kept dense anyway (an LM
    head, a tied layer) is accepted for every criterion.
    """
    protect = tuple(name for name in spec.protect if name not in prepared.kept_dense)
    if prepared.nm is not None:
        return planner.plan(prepared.ranking, nm_sparsity(prepared.nm), "local", protect=protect)
    plan = planner.plan(prepared.ranking, spec.sparsity, spec.scope, overrides=spec.overrides,
                        protect=protect, min_keep=spec.min_keep)
    if spec.round_to > 1:
        if prepared.structure != "channel":
            raise ExplorerError(f"round_to rounds kept channels; it needs --structure channel, not "
                                f"{prepared.structure}.")
        plan = planner.round_kept(plan, spec.round_to, prepared.ranking)
    return plan


def _keep_factors(prepared: Prepared, plan: planner.Plan) -> tuple[dict[str, float], dict[str, float]]:
    groups = {group.name: group for group in prepared.groups}
    out_keep: dict[str, float] = {}
    in_keep: dict[str, float] = {}
    for layer_plan in plan.layers:
        group = groups[layer_plan.name]
        ratio = layer_plan.kept / max(1, layer_plan.total)
        for member in group.members:
            if member.cut == "out":
                out_keep[member.layer] = ratio
            elif member.layer not in out_keep or not member.depthwise:
                in_keep[member.layer] = ratio
    return out_keep, in_keep


def estimate(prepared: Prepared, plan: planner.Plan) -> dict:
    """Live numbers for a plan, without pruning: parameters and FLOPs of the prunable layers.

    Unstructured: non-zero weights and effective FLOPs (dense FLOPs x density) are exact.
    Channel: each layer's weights and FLOPs scale with the kept fraction of its output
    channels times the kept fraction of its input channels (a depthwise conv only once);
    biases and BatchNorm are left out, so this is an estimate, replaced by exact counts on Apply.
    """
    prunable_params = sum(prepared.layer_params.values())
    if prepared.structure in ("unstructured", "nm"):
        removed = sum(layer.pruned for layer in plan.layers)
        flops_after = prepared.flops_dense - sum(
            prepared.layer_flops.get(layer.name, 0) * layer.pruned / max(1, layer.total) for layer in plan.layers)
        params_after = prepared.params_total - removed
        exact = True
    else:
        out_keep, in_keep = _keep_factors(prepared, plan)
        removed_params, removed_flops = 0.0, 0.0
        for name, params in prepared.layer_params.items():
            keep = out_keep.get(name, 1.0) * (1.0 if prepared.layer_kinds[name].startswith("depthwise")
                                              else in_keep.get(name, 1.0))
            removed_params += params * (1 - keep)
            removed_flops += prepared.layer_flops.get(name, 0) * (1 - keep)
        params_after = prepared.params_total - int(round(removed_params))
        flops_after = prepared.flops_dense - removed_flops
        exact = False
    flops_after = max(0, int(round(flops_after)))
    return {
        "params_total": prepared.params_total,
        "params_after": int(params_after),
        "prunable_params": prunable_params,
        "flops_dense": prepared.flops_dense,
        "flops_after": flops_after,
        "speedup_flops": prepared.flops_dense / max(1, flops_after),
        "size_bytes_dense": 4 * prepared.params_total,
        "size_bytes_estimate": 4 * int(params_after),
        "exact": exact,
    }


def thresholds(prepared: Prepared, plan: planner.Plan, names=None) -> dict[str, float | None]:
    """Per layer, the highest score that is pruned (None when the layer loses nothing); ``names`` limits it
    to those layers (the histograms a page shows).

    For unstructured magnitude pruning this is the |w| cut to draw on a weight histogram. A lean magnitude
    preparation keeps no scores: a layer's cut is then the ``k``-th smallest ``|w|`` of that layer alone
    (``k`` its pruned count), the same number, computed only for the layers asked for.
    """
    order = prepared.ranking.order
    if prepared.lean and (prepared.criterion != "magnitude" or order is None):
        raise ExplorerError("A lean preparation keeps no scores to draw thresholds from; prepare without lean.")
    result: dict[str, float | None] = {}
    for layer_plan in plan.layers:
        if names is not None and layer_plan.name not in names:
            continue
        if layer_plan.pruned == 0:
            result[layer_plan.name] = None
        elif prepared.lean:
            scores = weight_of(order.modules[layer_plan.name]).detach().abs().float().reshape(-1)
            result[layer_plan.name] = float(scores.kthvalue(layer_plan.pruned).values)
        else:
            index = planner.pruned_indices(prepared.ranking, plan, layer_plan.name)
            result[layer_plan.name] = float(prepared.scores[layer_plan.name].reshape(-1)[index].max())
    return result


def apply(model: nn.Module, prepared: Prepared, plan: planner.Plan, *,
          progress: Callable[[float, str], None] | None = None, in_place: bool = False) -> nn.Module:
    """The pruned copy: masks (unstructured) or channels physically removed. ``model`` is untouched.

    With sequential calibration the plan's per-layer counts are pruned block by block
    (`explorer.blocks.sequential_prune`), each block calibrated on the pruned blocks before it.
    A lean preparation prunes layer by layer (`explorer.lean.prune`), its zeros plain weights (no
    masks); ``in_place=True`` then prunes ``model`` itself, no copy, for a caller that has measured
    the base already (`explorer.measure.measure_baseline`) and needs it no more.
    """
    if plan.collapsed:
        names = ", ".join(plan.collapsed[:3])
        raise ExplorerError(f"This plan empties {names}: the network would be cut in two. Lower the sparsity, "
                            "switch to local scope, protect the layer or set a min_keep guard.")
    if prepared.lean:
        pruned = model if in_place else clone_model(model)
        lean_path.prune(pruned, prepared.criterion, {lp.name: lp.pruned for lp in plan.layers}, prepared.calib,
                   nm=prepared.nm, sequential=prepared.sequential, progress=progress)
        return pruned
    if prepared.sequential:  # the plan's per-layer counts; the masks from blocks calibrated on pruned blocks
        pruned = clone_model(model)
        blocks.sequential_prune(pruned, prepared.calib, prepared.criterion,
                                {lp.name: lp.pruned for lp in plan.layers}, nm=prepared.nm, progress=progress)
        return pruned
    if prepared.criterion == "sparsegpt":
        pruned = clone_model(model)
        llm.sparsegpt_prune(pruned, prepared.hessians,
                            {lp.name: lp.sparsity for lp in plan.layers if lp.name in prepared.hessians},
                            nm=prepared.nm, progress=progress)
        return pruned
    if prepared.structure in ("unstructured", "nm"):
        return masking.apply(model, plan, prepared.ranking)
    if prepared.structure == "head":
        units = {lp.name: planner.pruned_indices(prepared.ranking, plan, lp.name) for lp in plan.layers if lp.pruned}
        if any(g.kind == gqa.KIND for g in prepared.groups):
            pruned = clone_model(model)
            gqa.remove_groups(pruned, units)
            return pruned
        packed = {g.name for g in prepared.groups if g.kind == mha.KIND}
        traced = {name: info for name, info in prepared.attention.items() if name not in packed}
        rest = {name: idxs for name, idxs in units.items() if name not in packed}
        pruned = structural.apply(model, heads.expand(rest, traced), prepared.example_input) if rest \
            else clone_model(model)
        heads.fix_head_counts(pruned, traced)
        mha.remove_heads(pruned, {name: idxs for name, idxs in units.items() if name in packed})
        return pruned
    return structural.apply_plan(model, plan, prepared.ranking, prepared.example_input)


def measure_run(base_model: nn.Module, pruned_model: nn.Module, dataset: Dataset,
                spec: MeasureSpec = MeasureSpec(), *, base_accuracy: float | None = None,
                base_task_value: float | None = None, reference_outputs: list | None = None,
                progress: Callable[[float, str], None] | None = None, cancel=None,
                base_figures: dict | None = None, peak_memory: bool = True) -> dict:
    """The task metric plus theoretical and measured cost of a pruned model next to its base.

    The one measurement call of the app, the CLI and recipes (same defaults everywhere).
    Latency of both models is measured in the same call, with the same batch, threads and
    layout; a masked model is measured as deployed (`measure.as_deployed`). FLOPs are per input.
    ``sparsity_actual`` is the run's sparsity: the fraction of the base model's prunable weights that
    are gone, masked off or physically removed (`layers.prunable_counts`: a weight its mask keeps is
    live even while it is zero). ``zero_fraction_all_params`` counts something else: the fraction of
    all the base model's parameters (biases and norms included) that are zero or removed in the
    deployed copy, the figure a compressed file sees.
    ``task`` is ``{name, measure, base, pruned, higher_is_better}``: accuracy for a classifier
    on labelled data (then ``accuracy`` / ``base_accuracy`` hold the same numbers), perplexity for
    a causal language model, fidelity to ``base_model`` otherwise (``accuracy`` is then None).
    ``base_accuracy`` / ``base_task_value`` skip recomputing the base model's value, and
    ``reference_outputs`` (`tasks.reference_outputs` of the base model on the test split) its forwards
    for fidelity, when several pruned copies of one base are measured. ``base_figures``
    (`measure.measure_baseline`: taken before an in-place prune, or read from `explorer.basecache`) stand in
    for the base's parameter count, FLOPs and compressed size; ``peak_memory=False`` skips the memory
    estimate for a caller that never shows it. ``spec.eval_tokens`` bounds both perplexities' tokens.
    ``semi_structured`` is None unless some Linear carries a 2:4 weight; then it holds the 2:4 model
    timed with PyTorch's semi-structured kernels next to dense on a capable GPU, or the reason it
    cannot be (`semistructured.semi_structured_latency`). ``runtimes`` is present when the spec names
    runtimes (``measure: {runtimes: [eager, onnxruntime]}``): dense vs pruned timed on each at the spec's
    batch (`deploy.runtimes.compare_runtimes`).

    It runs in stages, each reported to ``progress(fraction, line)`` as it starts (`MEASURE_STAGES`: size
    and counts, then the task metric, then latency and runtimes); ``cancel`` (a `threading.Event`) is checked
    between them, and between two batches of a perplexity. A cancelled measurement keeps the stages it finished,
    the others None, and says where it stopped in ``cancelled`` (``"evaluate"`` or ``"latency"``; None for a
    full measurement).
    """
    spec.validate()
    report = progress or (lambda fraction, line: None)
    stopped = lambda: cancel is not None and cancel.is_set()  # noqa: E731 - read between stages
    deployed = measure.as_deployed(pruned_model)  # folded once: no mask hook in every evaluation forward
    report(0.0, MEASURE_STAGES["size"])
    metrics = measure.report(deployed, dataset.example_input(spec.batch),
                             baseline=base_model if base_figures is None else None, baseline_figures=base_figures,
                             latency=False, memory=peak_memory).to_dict()
    metrics["cancelled"] = None
    name = tasks.task_for(base_model, dataset)

    def not_evaluated() -> dict:
        measure_name = name if name in ("accuracy", "perplexity") else tasks.default_measure(base_model)
        base = base_accuracy if name == "accuracy" else base_task_value if base_task_value is not None \
            else tasks.PERFECT.get(measure_name)
        metrics.update(cancelled="evaluate", accuracy=None, base_accuracy=base_accuracy, delta_accuracy=None,
                       semi_structured=None, task={"name": name, "measure": measure_name, "base": base, "pruned": None,
                                                   "higher_is_better": tasks.HIGHER_IS_BETTER.get(measure_name, True)})
        return _sparsity_figures(metrics, base_model, pruned_model)

    if stopped():
        return not_evaluated()
    report(0.2, MEASURE_STAGES["evaluate"])
    if name == "accuracy":
        accuracy = evaluate(deployed, dataset, "test")["accuracy"]
        if base_accuracy is None:
            base_accuracy = base_task_value if base_task_value is not None else \
                evaluate(base_model, dataset, "test")["accuracy"]
        metrics.update(accuracy=accuracy, base_accuracy=base_accuracy, delta_accuracy=accuracy - base_accuracy)
        task = {"name": "accuracy", "measure": "accuracy", "base": base_accuracy, "pruned": accuracy,
                "higher_is_better": True}
    else:
        def follow(fraction: float, text: str) -> None:
            if stopped():  # perplexity goes batch by batch (minutes on a 1 B model): a cancel stops between two
                raise _EvaluationStopped
            report(0.2 + 0.3 * fraction, f"{MEASURE_STAGES['evaluate']} {text}")

        try:
            result = tasks.evaluate_task(deployed, dataset, reference=base_model, task=name, outputs=reference_outputs,
                                         max_tokens=spec.token_budget, progress=follow)
            if base_task_value is None:
                base_task_value = tasks.evaluate_task(base_model, dataset, task=name, max_tokens=spec.token_budget,
                                                      progress=follow)["value"] \
                    if name == "perplexity" \
                    else tasks.PERFECT[result["measure"]]
        except _EvaluationStopped:
            return not_evaluated()
        metrics.update(accuracy=None, base_accuracy=None, delta_accuracy=None)
        task = {"name": name, "measure": result["measure"], "base": base_task_value, "pruned": result["value"],
                "higher_is_better": result["higher_is_better"], "measures": result["measures"]}
        if name == "perplexity":  # {scored, total}: what an output line says ("on the first 1,020 of 8,607 ...")
            task["tokens"] = dict(zip(("scored", "total"), tasks.eval_tokens(dataset, "test", spec.token_budget)))
    if spec.latency and stopped():
        metrics["cancelled"] = "latency"
    elif spec.latency:
        report(0.5, MEASURE_STAGES["latency"])
        metrics.update(measure.latency_metrics(deployed, dataset.example_input(spec.batch), baseline=base_model,
                                               device=spec.device, threads=spec.threads,
                                               min_run_time=spec.min_run_time, max_run_time=spec.max_run_time))
    metrics["semi_structured"] = None if metrics["cancelled"] else semistructured.semi_structured_latency(
        deployed, dataset.example_input(spec.batch), min_run_time=spec.min_run_time, time_it=spec.latency,
    ) if semistructured.has_2_4_layer(deployed) else None
    if spec.runtimes and not metrics["cancelled"]:  # the recipe names runtimes: dense vs pruned on each, at its batch
        from explorer.deploy.runtimes import compare_runtimes

        metrics["runtimes"] = compare_runtimes(base_model, deployed, dataset.example_input(spec.batch),
                                               runtimes=spec.runtimes, batches=(spec.batch,), threads=spec.threads,
                                               min_run_time=spec.min_run_time, max_run_time=spec.max_run_time)
    metrics["task"] = task
    return _sparsity_figures(metrics, base_model, pruned_model)


class _EvaluationStopped(Exception):
    """A cancel seen between two batches of the task metric (`measure_run` keeps the stages before it)."""


MEASURE_STAGES = {"size": "Counting parameters and FLOPs, compressing the file ...",
                  "evaluate": "Evaluating the task metric on the test split ...",
                  "latency": "Timing base and pruned on the same batch (latency) ..."}


def _sparsity_figures(metrics: dict, base_model: nn.Module, pruned_model: nn.Module) -> dict:
    metrics.update(zero_fraction_all_params=1 - metrics["params_nonzero"] / max(1, metrics["baseline_params_total"] or 1),
                   sparsity_actual=1 - prunable_counts(pruned_model)[0] / max(1, prunable_counts(base_model)[1]))
    return metrics


def reopen(base_model: nn.Module, dataset: Dataset, recipe, weights: str | Path | None = None) -> nn.Module:
    """The pruned copy a stored run describes, so a reload or a link finds the work it left.

    With the run's weights file (written by `explorer.store.RunStore.save`) the copy is read back,
    pruned shapes included; a masked structure (unstructured, N:M) gets its masks back from the
    zeros of the file, so a fine-tune keeps them zero. Without one, the recipe's scoring and plan
    are replayed on ``base_model`` (the same seed gives the same cut). ``base_model`` is untouched.
    """
    scoring, plan_spec = recipe.scoring, recipe.plan
    if weights is not None and Path(weights).is_file():
        module = load_model(str(weights)).eval()
        if scoring.structure in ("unstructured", "nm"):
            zeros = {name: weight_of(layer).detach() != 0 for name, layer in prunable_layers(module)
                     if bool((weight_of(layer).detach() == 0).any())}
            module = masking.apply_masks(module, zeros) if zeros else module
        return module
    prepared = prepare(base_model, scoring, dataset=dataset)
    return apply(base_model, prepared, preview(prepared, plan_spec))
