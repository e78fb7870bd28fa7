"""Physical channel removal through torch-pruning's dependency graph.

Removing filter ``k`` of a convolution is never a local edit: input channel ``k`` of every
consumer must go too, so must entry ``k`` of the BatchNorm that follows, and across a
residual add (or a depthwise convolution, whose input and output channels are the same
channels) the matching channel of every *coupled* layer must go at the same time. A set of
layers whose channels have to be removed together is a **channel group**; one channel of
the group is the unit the planner ranks and removes.

This is the only module that touches torch-pruning internals (``tp.DependencyGraph``,
``Group`` items, their ``dep`` / ``idxs`` / ``root_idxs``). Everything it returns is plain
data (``ChannelGroup``), so the UI, the planner and recipes never see torch-pruning.

Example::

    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    scores = group_scores(model, groups, criteria.channel_scores(model, "magnitude"))
    smaller = apply(model, {"conv1": torch.tensor([0, 5])}, torch.randn(1, 3, 32, 32))
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from explorer import deadline
from explorer.errors import ExplorerError
from explorer.layers import clone_model

_EMPTIED_HINT = "lower sparsity, use local scope or min_keep"
deadline.guard_torch_pruning()  # `deadline.limit` bounds the trace from inside torch-pruning's loops
_REDUCTIONS = ("mean", "sum", "max", "first")


@dataclass
class GroupMember:
    """One layer touched by a channel group.

    ``cut`` says which of the layer's dimensions shrink: ``"out"`` (filters, neurons,
    BatchNorm entries; a depthwise conv's in- and out-channels, which are the same) or
    ``"in"`` (the consumer's input channels). ``idxs[j]`` is the layer's channel that goes
    when unit ``units[j]`` of the group is removed; across a concat the layer sees only
    part of the group, at an offset, which is what the two lists record; after a flatten one
    unit is ``H x W`` of the consumer's inputs, so it appears that many times in ``units``.
    ``params_per_channel`` is what the layer loses per index in ``idxs``, measured on a copy
    (zero for a weight tied to an earlier member's, which is counted there).
    """

    layer: str
    type: str
    cut: str
    channels: int
    depthwise: bool = False
    idxs: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    params_per_channel: int = 0


@dataclass
class ChannelGroup:
    """Layers whose channels are removed together; ``name`` is the root layer's name.

    ``params_per_channel_naive`` counts only the root filter (its weight slice and bias),
    which is what a per-layer view suggests; ``params_per_channel_real`` counts every
    parameter that really disappears with one channel of the group (coupled convs, the
    consumers' input channels, all ``H x W`` of them after a flatten, BatchNorm weight and
    bias), averaged over the group's channels: exact when every channel costs the same
    (``uniform()``), and ``params_removed`` is exact for any set of channels.
    ``root_channels[u]`` is the root layer's channel behind unit ``u``.
    """

    name: str
    kind: str
    channels: int
    members: list[GroupMember]
    params_per_channel_real: float
    params_per_channel_naive: int
    root_channels: list[int] = field(default_factory=list)

    def out_layers(self) -> list[str]:
        """Names of the layers whose outputs shrink (the coupled producers)."""
        return [m.layer for m in self.members if m.cut == "out"]

    def params_removed(self, units) -> int:
        """Parameters that go when ``units`` (indices into the group's channels) are removed.

        Each member loses its ``params_per_channel`` for every index it holds of a chosen unit,
        so a concat member that sees only some units counts only those. (A layer whose inputs
        and outputs were both in one group would lose the weights where they cross once, counted
        twice here; torch-pruning builds no such group for the zoo or the built-in transformers.)
        """
        chosen = {int(u) for u in units}
        return sum(m.params_per_channel * sum(u in chosen for u in m.units) for m in self.members)

    def uniform(self) -> bool:
        """True when every channel frees the same parameters, so ``k * params_per_channel_real`` is exact.

        Only a group whose channels reach layers of different sizes (the branches of a concat)
        has channels of different costs.
        """
        costs = [0] * self.channels
        for member in self.members:
            for unit in member.units:
                costs[unit] += member.params_per_channel
        return len(set(costs)) <= 1

    def to_dict(self) -> dict:
        return asdict(self)


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """List the channel groups of ``model``: every set of channels that can be removed.

    One group per root Conv/Linear whose output channels can go. Layers coupled by a
    residual add, a depthwise conv or a concat appear in one group, reported once. Groups
    that would change the model's output (the classifier's outputs) are left out, and so
    are groups through grouped (non-depthwise) convolutions, which torch-pruning does not
    slice correctly. The model is traced on a copy and is not modified.
    """
    return channel_groups_and_skipped(model, example_input)[0]


def channel_groups_and_skipped(model: nn.Module, example_input: torch.Tensor) -> tuple[list[ChannelGroup], list[dict]]:
    """`channel_groups`, plus the groups left out: ``{"root", "layers", "reason"}`` each (for a compatibility report)."""
    traced = _copy_for_tracing(model)
    skipped: list[dict] = []
    return _trace(traced, example_input, skipped)[1], skipped


def group_of(groups: list[ChannelGroup], layer_name: str) -> ChannelGroup | None:
    """The group whose removal shrinks ``layer_name``'s outputs, or ``None``.

    ``None`` means the layer's outputs are not prunable (the classifier). A layer is also an
    ``"in"`` member of the group feeding it; that one is not returned here.
    """
    for group in groups:
        if layer_name in group.out_layers():
            return group
    return None


def group_scores(
    model: nn.Module,
    groups: list[ChannelGroup],
    per_layer_channel_scores: dict[str, torch.Tensor],
    *,
    reduce: str = "mean",
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """Turn per-layer channel scores into one score per unit of each group.

    A coupled channel is only as removable as all its layers together, so the scores of
    every out-member (conv/linear) are combined per unit with ``reduce``: ``"mean"``,
    ``"sum"``, ``"max"`` or ``"first"`` (the root layer alone). Concat offsets come from the
    group's index mapping. With ``normalize`` each layer's scores are first divided by that
    layer's mean absolute score: inside a group no layer dominates by its scale, and across
    groups a global threshold compares how a channel ranks *within its layer* rather than
    which layer has the largest weights (a raw global ranking of L1 norms mostly empties the
    layers with small weights). Pass ``normalize=False`` for raw scores.
    """
    if reduce not in _REDUCTIONS:
        raise ExplorerError(f"unknown group reduction {reduce!r}: choose one of {', '.join(_REDUCTIONS)}")
    modules = dict(model.named_modules())
    result = {}
    for group in groups:
        scored = [m for m in group.members if m.cut == "out" and m.layer in per_layer_channel_scores]
        if reduce == "first":
            scored = [m for m in scored if m.layer == group.name]
        if not scored:
            raise ExplorerError(
                f"no channel scores for group {group.name!r} (layers {', '.join(group.out_layers())}): "
                "score the model again with the same architecture"
            )
        total = torch.zeros(group.channels)
        count = torch.zeros(group.channels)
        if reduce == "max":
            total.fill_(-float("inf"))
        for member in scored:
            layer_scores = _checked_scores(modules, member.layer, per_layer_channel_scores[member.layer])
            if normalize:
                scale = layer_scores.abs().mean()
                layer_scores = layer_scores / scale if scale > 0 else layer_scores
            units = torch.tensor(member.units, dtype=torch.long)
            values = layer_scores[torch.tensor(member.idxs, dtype=torch.long)]
            if reduce == "max":
                total[units] = torch.maximum(total[units], values)
            else:
                total.index_add_(0, units, values)
            count.index_add_(0, units, torch.ones_like(values))
        if bool((count == 0).any()):
            raise ExplorerError(f"some channels of group {group.name!r} have no score: score every conv/linear layer")
        result[group.name] = total / count if reduce == "mean" else total
    return result


def apply(
    model: nn.Module,
    prune_idxs: dict[str, torch.Tensor],
    example_input: torch.Tensor,
) -> nn.Module:
    """Return a smaller copy of ``model`` with the given channels physically removed.

    ``prune_idxs`` maps a group name (see ``channel_groups``) to the unit indices to remove
    from that group. Every coupled layer shrinks with its group, so the result runs forward
    and backward at its new size. ``model`` itself is never modified. Every layer keeps at
    least one channel; a request that would empty one raises ``ExplorerError``.
    """
    pruned = _copy_for_tracing(model)
    ties = _tied_parameters(pruned)
    graph, found = _trace(pruned, example_input)
    groups = {g.name: g for g in found}
    requests = _validated_requests(groups, prune_idxs)
    _check_nothing_emptied(pruned, groups, requests)

    modules = dict(pruned.named_modules())
    removed: dict[str, list[int]] = {}  # layer -> its original output channels already gone
    for name, units in requests.items():
        group = groups[name]
        root = modules[name]
        gone_before = removed.get(name, [])
        # A root partly shrunk by an earlier group (partial coupling through a concat)
        # has shifted channel positions; torch-pruning wants current positions.
        root_idxs = [c - sum(r < c for r in gone_before) for c in (group.root_channels[u] for u in units)]
        pruning_fn = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, pruning_fn, root_idxs).prune()
        chosen = set(units)
        for member in group.members:
            if member.cut == "out":
                removed.setdefault(member.layer, []).extend(
                    i for i, u in zip(member.idxs, member.units) if u in chosen
                )
    _retie(pruned, ties)
    _restore_modes(model, pruned)
    return pruned


def apply_plan(model: nn.Module, plan, ranking, example_input: torch.Tensor) -> nn.Module:
    """Apply a planner ``Plan`` whose layers are channel groups (keyed by group name).

    For each planned group the lowest-ranked ``pruned`` units come from
    ``planner.pruned_indices``; a group the plan marks as collapsed is refused with an
    actionable error instead of being emptied.
    """
    from explorer import planner

    prune_idxs = {}
    for layer_plan in plan.layers:
        if layer_plan.pruned <= 0:
            continue
        if layer_plan.collapsed or layer_plan.kept <= 0:
            raise ExplorerError(f"layer {layer_plan.name} would be emptied: {_EMPTIED_HINT}")
        prune_idxs[layer_plan.name] = planner.pruned_indices(ranking, plan, layer_plan.name)
    return apply(model, prune_idxs, example_input)


# --- internals -------------------------------------------------------------------------


def _copy_for_tracing(model: nn.Module) -> nn.Module:
    """Deep copy; tracing switches the copy to eval mode (BN statistics must not move)."""
    traced = clone_model(model)
    traced.eval()
    return traced


def _tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """(module, attribute) pairs that share one parameter, such as GPT-2's embedding and output head."""
    shared: dict[int, list[tuple[str, str]]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        module, _, attribute = name.rpartition(".")
        shared.setdefault(id(parameter), []).append((module, attribute))
    return [places for places in shared.values() if len(places) > 1]


def _retie(model: nn.Module, ties: list[list[tuple[str, str]]]) -> None:
    """Share each tied parameter again: torch-pruning cuts every holder of it into a copy of its own."""
    for (first_module, first_attribute), *others in ties:
        parameter = getattr(model.get_submodule(first_module), first_attribute)
        for module, attribute in others:
            holder = model.get_submodule(module)
            if getattr(holder, attribute).shape == parameter.shape:
                setattr(holder, attribute, parameter)


def _restore_modes(source: nn.Module, target: nn.Module) -> None:
    """Give ``target``'s modules the train/eval flags of ``source``'s (names match)."""
    flags = {name: m.training for name, m in source.named_modules()}
    for name, module in target.named_modules():
        module.training = flags.get(name, module.training)


def _trace(model: nn.Module, example_input, skipped: list | None = None) -> tuple[tp.DependencyGraph, list[ChannelGroup]]:
    """torch-pruning's dependency graph of ``model`` (a copy) and its channel groups, within `deadline.trace_limit`.

    Some models keep torch-pruning's trace busy for longer than anyone waits (torchvision's swin_t and
    maxvit_t: over 10 minutes); past the limit the trace is abandoned (the copy with it) and the model
    refused in one line.
    """
    limit = deadline.trace_limit()
    try:
        with deadline.limit(limit):
            graph = _build_graph(model, example_input)
            return graph, _enumerate_groups(graph, model, skipped)
    except deadline.TimeLimit:
        raise ExplorerError(
            f"torch-pruning could not trace this model within {limit:g} s (its dependency trace of some models, "
            "such as torchvision's swin_t and maxvit_t, runs for more than 10 minutes): use unstructured or N:M "
            f"pruning, or set {deadline.ENV}=SECONDS to wait longer (0: no limit)."
        ) from None


def _build_graph(model: nn.Module, example_input) -> tp.DependencyGraph:
    def forward(module, inputs):
        return module(inputs)

    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=forward, verbose=False
            )
    except Exception as error:  # torch-pruning raises anything from asserts to KeyErrors
        raise ExplorerError(
            f"torch-pruning could not trace this model ({type(error).__name__}: {error}). "
            "Structured removal needs a forward pass made of standard layers (Conv, Linear, "
            "BatchNorm, add, cat) and an example input of the right shape; "
            "use unstructured (mask) pruning for this model instead."
        ) from error


def _enumerate_groups(graph: tp.DependencyGraph, model: nn.Module, skipped: list | None = None) -> list[ChannelGroup]:
    """Partition all prunable output channels into groups, roots in module order; ``skipped`` hears the others."""
    names = graph._module2name
    covered: set[tuple[str, int]] = set()
    groups = []
    for root_name, root in model.named_modules():
        if not isinstance(root, (nn.Conv1d, nn.Conv2d, nn.Linear)) or root not in graph.module2node:
            continue
        pruner = graph.get_pruner_of_module(root)
        out_channels = pruner.get_out_channels(root) if pruner else None
        if not out_channels:
            continue
        free = [c for c in range(out_channels) if (root_name, c) not in covered]
        if not free:
            continue
        tp_group = graph.get_pruning_group(root, pruner.prune_out_channels, free)
        for item in tp_group:
            if graph.is_out_channel_pruning_fn(item.dep.handler) and item.dep.target.module in names:
                covered.update((names[item.dep.target.module], i) for i in item.idxs)
        reason = _why_left_out(graph, tp_group)
        if reason is not None:
            if skipped is not None:
                layers = sorted({names[i.dep.target.module] for i in tp_group if i.dep.target.module in names})
                skipped.append({"root": root_name, "layers": layers, "reason": reason})
            continue
        groups.append(_describe(graph, tp_group, root_name, root, free))
    return groups


def _why_left_out(graph, tp_group) -> str | None:
    """Why a traced group is not offered for removal (None: it is)."""
    if _reaches_output(graph, tp_group):
        return "its channels are the model's outputs"
    if _has_grouped_conv(graph, tp_group):
        return "it runs through a grouped (not depthwise) convolution, which torch-pruning does not slice correctly"
    if _through_attention(tp_group):
        return ("it runs through nn.MultiheadAttention, whose width is its heads' width: prune its heads "
                "(--structure head) instead")
    if _overruns(graph, tp_group):
        return "torch-pruning maps its channels past a layer's size (a fused projection it misreads)"
    return None


def _through_attention(tp_group) -> bool:
    """True if the group cuts an ``nn.MultiheadAttention``'s embedding width.

    torch-pruning removes the same index from the query, key, value and output projections as from
    the residual stream: dimensions of different heads go, the heads no longer line up.
    """
    return any(isinstance(item.dep.target.module, nn.MultiheadAttention) for item in tp_group)


def _reaches_output(graph, tp_group) -> bool:
    """True if removing these channels would change the model's output shape."""
    return any(
        graph.is_out_channel_pruning_fn(item.dep.handler) and not item.dep.target.outputs
        for item in tp_group
    )


def _has_grouped_conv(graph, tp_group) -> bool:
    for item in tp_group:
        module = item.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.in_channels:
            return True
    return False


def _overruns(graph, tp_group) -> bool:
    """True if torch-pruning maps a channel past a layer's size: it misread the graph between them.

    GPT-2's fused query-key-value projection is one: its 192 outputs are split into three and
    reshaped into heads, and torch-pruning maps all 192 onto the 64 inputs of the attention's
    output projection. Removing such a channel leaves a model that no longer runs.
    """
    for item in tp_group:
        module = item.dep.target.module
        pruner = graph.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
        if pruner is None or not item.idxs:
            continue
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        size = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
        if size is not None and max(int(i) for i in item.idxs) >= size:
            return True
    return False


def _describe(graph, tp_group, root_name, root, root_channels) -> ChannelGroup:
    names = graph._module2name
    unit_of = {c: u for u, c in enumerate(root_channels)}
    merged: dict[tuple[str, str], GroupMember] = {}
    deps: dict[tuple[str, str], list] = {}  # member -> the torch-pruning dependencies that cut it
    for item in tp_group:
        module = item.dep.target.module
        if module not in names or not isinstance(module, nn.Module):
            continue  # torch-pruning's own add/cat/reshape nodes hold no parameters
        layer = names[module]
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1
        cut = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) or depthwise else "in"
        member = merged.setdefault(
            (layer, cut), GroupMember(layer=layer, type=type(module).__name__, cut=cut, channels=0, depthwise=depthwise)
        )
        seen = set(member.idxs)
        for idx, root_idx in zip(item.idxs, item.root_idxs):
            if idx not in seen and root_idx in unit_of:
                seen.add(idx)
                member.idxs.append(int(idx))
                member.units.append(unit_of[root_idx])
        member.channels = len(member.idxs)
        handlers = deps.setdefault((layer, cut), [])
        if all(dep.handler != item.dep.handler for dep, _ in handlers):
            handlers.append((item.dep, {int(i) for i in item.idxs}))
    members = sorted(merged.values(), key=lambda m: (m.cut != "out", m.layer != root_name))
    _price_members(members, deps, {layer: module for module, layer in names.items()})
    channels = len(root_channels)
    group = ChannelGroup(
        name=root_name,
        kind=_kind(members, root),
        channels=channels,
        members=members,
        params_per_channel_real=0,
        params_per_channel_naive=_naive_params(root),
        root_channels=[int(c) for c in root_channels],
    )
    real = group.params_removed(range(channels)) / channels
    group.params_per_channel_real = int(real) if float(real).is_integer() else real
    return group


def _kind(members: list[GroupMember], root: nn.Module) -> str:
    producers = {m.layer for m in members if m.cut == "out" and not m.depthwise and m.type.startswith(("Conv", "Linear"))}
    if len(producers) > 1:
        return "residual-coupled"
    if any(m.depthwise for m in members):
        return "depthwise"
    return "linear" if isinstance(root, nn.Linear) else "conv"


def _price_members(members: list[GroupMember], deps: dict, modules: dict[str, nn.Module]) -> None:
    """Set each member's ``params_per_channel`` by cutting one of its indices on a copy of its layer.

    All of a member's dependencies are applied together (a depthwise conv loses a filter and an
    input channel at once). A weight shared with a layer already priced (GPT-2's tied embedding
    and output head) is counted once: the removal re-ties it, so it goes once.
    """
    priced: dict[int, str] = {}  # id of an original parameter -> the layer that counted it
    for member in members:
        if not member.idxs:
            continue
        module = modules[member.layer]
        idx = member.idxs[0]
        trial = clone_model(module)
        before = {name: p.numel() for name, p in trial.named_parameters()}
        for dep, idxs in deps[(member.layer, member.cut)]:
            if idx in idxs:
                dep.handler.__self__.pruning_dim = dep.target.pruning_dim  # as Dependency.__call__ does
                trial = dep.handler(trial, [idx]) or trial
        after = {name: p.numel() for name, p in trial.named_parameters()}
        lost = 0
        for name, parameter in module.named_parameters():
            owner = priced.setdefault(id(parameter), member.layer)
            if owner == member.layer:
                lost += before[name] - after.get(name, 0)
        member.params_per_channel = int(lost)


def _naive_params(root: nn.Module) -> int:
    """One filter (conv) or one neuron's weights (linear), plus its bias."""
    filter_params = root.weight[0].numel()
    return filter_params + (1 if root.bias is not None else 0)


def _validated_requests(groups: dict[str, ChannelGroup], prune_idxs) -> dict[str, list[int]]:
    requests = {}
    for name, idxs in prune_idxs.items():
        if name not in groups:
            raise ExplorerError(
                f"{name!r} is not a prunable channel group; choose one of: {', '.join(groups) or '(none)'}"
            )
        units = sorted({int(i) for i in torch.as_tensor(idxs, dtype=torch.long).flatten().tolist()})
        if not units:
            continue
        if units[0] < 0 or units[-1] >= groups[name].channels:
            raise ExplorerError(
                f"channel index out of range for group {name!r}: it has {groups[name].channels} channels"
            )
        requests[name] = units
    return requests


def _check_nothing_emptied(model, groups, requests) -> None:
    """Count removed output channels per layer over all groups; refuse to empty one."""
    modules = dict(model.named_modules())
    removed: dict[str, set[int]] = {}
    for name, units in requests.items():
        chosen = set(units)
        for member in groups[name].members:
            if member.cut != "out":
                continue
            gone = {i for i, u in zip(member.idxs, member.units) if u in chosen}
            removed.setdefault(member.layer, set()).update(gone)
            if len(removed[member.layer]) >= _out_channels(modules[member.layer]):
                raise ExplorerError(f"layer {member.layer} would be emptied: {_EMPTIED_HINT}")


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):  # its weight is (vocabulary, width): the width is what a group cuts
        return int(module.embedding_dim)
    if isinstance(module, nn.MultiheadAttention):  # its packed query, key and value rows
        return int(module.in_proj_weight.shape[0]) if module.in_proj_weight is not None else int(module.embed_dim)
    for attribute in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attribute):
            return int(getattr(module, attribute))
    return int(module.weight.shape[0])


def _checked_scores(modules, layer: str, scores) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().float().flatten().cpu()
    expected = _out_channels(modules[layer]) if layer in modules else scores.numel()
    if scores.numel() != expected:
        raise ExplorerError(
            f"layer {layer} has {expected} channels but {scores.numel()} scores: "
            "scores must come from the same (unpruned) model"
        )
    return scores
