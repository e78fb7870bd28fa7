"""Scores -> Plan: how many units each layer loses at a given sparsity, instantly.

A *unit* is whatever a score tensor scores: one weight (unstructured pruning) or one
output channel (structured pruning); the planner never needs to know which. The work
is split in two so that the UI slider stays instant:

* :func:`prepare` sorts every unit of every layer once (``O(N log N)``) into a
  :class:`Ranking`;
* :func:`plan` then answers "what does sparsity S do?" with a few binary searches per
  layer (``O(layers · log N)``), returning a :class:`Plan`: plain, JSON-serialisable data.

Ties are broken deterministically: by score ascending, then by the layer's position in
the scores dict, then by the unit's flat index. Scores are ranked as float32, so scores
that differ by less than float32 resolution count as ties.

Pruning over time (iterative, gradual, sparse training) plans again on a model that is
already masked: ``prepare(scores, kept=mask)`` ranks the units the mask has pruned below
every live unit (their score counts as -inf, whatever the criterion said), and a plan
never revives them, so round after round the pruned sets grow and the counts stay exact.

Example::

    ranking = prepare(channel_scores(model, "magnitude"))
    p = plan(ranking, 0.5, scope="global", protect=["fc"])
    p.collapse_point       # pruned fraction at which the first layer would empty
    pruned_indices(ranking, p, "features.0")
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from explorer.errors import ExplorerError

SCOPES = ("local", "global")
GRID_SIZE = 4096
_INDEX_BITS = 32
_INDEX_MASK = np.uint64((1 << _INDEX_BITS) - 1)
_INFINITE_KEY = np.uint64(np.iinfo(np.uint64).max)


@dataclass
class Ranking:
    """Every unit of every layer sorted once; the cache behind instant plans.

    ``layer_keys[offsets[l]:offsets[l + 1]]`` holds layer ``l``'s sort keys in ascending
    order. A key packs the
    float32 score (as an order-preserving unsigned integer) above the unit's global index,
    so comparing keys compares (score, layer order, flat index) in one integer compare:
    "how many of layer l's units are among the k lowest" is one ``searchsorted``.
    ``grid_counts[l, g]`` caches that count at about ``GRID_SIZE`` cuts spread evenly over
    the global order (approximate quantiles), so a global plan only refines one bracket.
    ``already_pruned[l]`` counts layer ``l``'s units the current mask has pruned: they hold
    the layer's lowest keys (score -inf), and every plan prunes at least them.
    A ranking without keys (`explorer.lean.sizes_only`) plans local cuts only, unless its ``order``
    answers the global questions itself: ``order.counts(names, k)`` (how many of the ``k`` lowest
    units of those layers each holds) and ``order.collapse(names)`` (`_collapse_point`'s answer).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    layer_keys: np.ndarray = field(repr=False)
    grid_counts: np.ndarray = field(repr=False)
    already_pruned: np.ndarray = field(repr=False)
    order: object = field(default=None, repr=False)

    @property
    def total(self) -> int:
        """Number of units over all layers."""
        return int(self.offsets[-1])

    def index_of(self, name: str) -> int:
        """Position of layer ``name`` in the ranking's fixed layer order."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ExplorerError(
                f"Layer {name!r} is not in this ranking; known layers: {', '.join(self.names)}."
            ) from None

    def keys_of(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s keys in ascending order (a view, not a copy)."""
        return self.layer_keys[self.offsets[layer]:self.offsets[layer + 1]]

    def units(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat indices of layer ``layer``'s units ranked ``start .. stop - 1`` (lowest score first)."""
        global_index = self.keys_of(layer)[start:stop] & _INDEX_MASK
        global_index -= np.uint64(self.offsets[layer])
        return global_index.view(np.int64)

    def count_below(self, layer: int, key: np.uint64) -> int:
        """How many of layer ``layer``'s units sort strictly before ``key``."""
        return int(np.searchsorted(self.keys_of(layer), key, side="left"))


@dataclass
class LayerPlan:
    """One layer's share of a plan; ``source`` says which rule set its count."""

    name: str
    total: int
    kept: int
    pruned: int
    sparsity: float
    collapsed: bool
    source: str  # "global", "local", "override" or "protected"


@dataclass
class Plan:
    """What a sparsity does to each layer: pure data, no tensors, JSON-serialisable.

    ``collapse_point`` is the smallest pruned fraction of the pool (the layers ranked by
    ``scope``, i.e. all but overridden/protected ones) at which some pool layer keeps no
    unit; ``collapse_layer`` names it. It is ``None`` when nothing in the pool can collapse
    (``min_keep`` > 0, or an empty pool). ``target_met`` is False when ``min_keep`` made the
    requested count impossible, or when the current mask (``prepare(..., kept=...)``)
    already prunes more than requested, which a plan never revives; ``note`` then says why.
    A pool layer the current mask has emptied is collapsed at any sparsity
    (``collapse_point`` 0.0).
    """

    scope: str
    sparsity_requested: float
    sparsity_actual: float
    total: int
    pruned: int
    layers: list[LayerPlan]
    collapsed: list[str]
    collapse_point: float | None
    collapse_layer: str | None
    min_keep: float = 0.0
    overrides: dict[str, float] = field(default_factory=dict)
    protected: list[str] = field(default_factory=list)
    target_met: bool = True
    note: str = ""

    def to_dict(self) -> dict:
        """Plain dict of built-in types (``json.dumps`` works on it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["layers"] = [LayerPlan(**layer) for layer in values["layers"]]
        return cls(**values)

    def layer(self, name: str) -> LayerPlan:
        """The :class:`LayerPlan` of layer ``name``."""
        for layer_plan in self.layers:
            if layer_plan.name == name:
                return layer_plan
        raise ExplorerError(f"Layer {name!r} is not in this plan.")


def _sortable_uint32(values: np.ndarray) -> np.ndarray:
    """Map float32 to uint32 so that unsigned integer order equals float order.

    Positive floats get their sign bit set; negative floats have all bits flipped.
    ``-0.0`` is first turned into ``+0.0`` so the two zeros tie.
    """
    bits = (values + np.float32(0.0)).view(np.int32)
    flip = (bits >> 31) | np.int32(-(2**31))
    return (bits ^ flip).view(np.uint32)


_DEAD_SCORE = _sortable_uint32(np.array([-np.inf], dtype=np.float32))[0]


def _pack_keys(flats: list[np.ndarray], offsets: np.ndarray, dead: list[np.ndarray | None]) -> np.ndarray:
    """One uint64 key per unit: the sortable score in the high half, its global index in the low half.

    Written through a uint32 view of the key array (two half-words per key), which avoids
    64-bit temporaries: this is the slowest part of :func:`prepare` after the sorts. Units
    marked in ``dead[layer]`` get the sortable image of -inf, below every finite score.
    """
    keys = np.empty(int(offsets[-1]), dtype=np.uint64)
    halves = keys.view(np.uint32).reshape(-1, 2)
    high, low = (1, 0) if sys.byteorder == "little" else (0, 1)
    for layer, flat in enumerate(flats):
        start, stop = int(offsets[layer]), int(offsets[layer + 1])
        if flat.min() >= 0:  # the usual case: the bit pattern of a non-negative float sorts like it
            halves[start:stop, high] = (flat + np.float32(0.0)).view(np.uint32)
            halves[start:stop, high] |= np.uint32(1 << 31)
        else:
            halves[start:stop, high] = _sortable_uint32(flat)
        if dead[layer] is not None:
            scores_half = halves[start:stop, high]
            scores_half[dead[layer]] = _DEAD_SCORE
        halves[start:stop, low] = np.arange(start, stop, dtype=np.uint32)
    return keys


def _grid_keys(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """About ``GRID_SIZE`` cut keys at approximate quantiles of all keys, from 0 to 'infinity'.

    Every ``step``-th key of each (sorted) layer is sampled, the samples are sorted and
    ``GRID_SIZE`` of them picked evenly. Between two cuts every layer then has at most a
    few ``step`` units, which bounds the bracket a plan must refine.
    """
    total = int(offsets[-1])
    step = max(1, total // (GRID_SIZE * 16))
    samples = np.sort(
        np.concatenate([keys[offsets[layer]:offsets[layer + 1]][step - 1 :: step] for layer in range(len(offsets) - 1)])
    )
    picks = samples[np.linspace(0, samples.size - 1, min(GRID_SIZE, samples.size)).round().astype(np.int64)]
    return np.unique(np.concatenate([[np.uint64(0)], picks, [_INFINITE_KEY]]).astype(np.uint64))


def prepare(scores: Mapping[str, torch.Tensor], *, kept: Mapping[str, torch.Tensor] | None = None) -> Ranking:
    """Sort all units once so that every later :func:`plan` is a lookup.

    ``scores`` maps layer name -> score tensor (higher = more important = kept), as made by
    :func:`explorer.criteria.weight_scores` (units = weights) or
    :func:`explorer.criteria.channel_scores` (units = channels). The dict's order is the
    layer order used to break ties. Costs one sort per layer and a small sampled grid.

    ``kept`` is the current mask, ``{layer: tensor shaped like its scores}`` with nonzero /
    True = live and 0 / False = already pruned (layers left out are all live); make it with
    :func:`explorer.masking.kept_units`. Already-pruned units score -inf, so they rank below
    every live unit (ties among them by layer order, then flat index) and plans keep them pruned.
    """
    if not scores:
        raise ExplorerError("No scores to rank: the model has no prunable layers.")
    names = tuple(scores)
    kept = dict(kept or {})
    unknown = [name for name in kept if name not in scores]
    if unknown:
        raise ExplorerError(
            f"The current mask names layer {unknown[0]!r}, which has no scores; scored layers: {', '.join(names)}."
        )
    shapes, flats, deads = [], [], []
    for name in names:
        tensor = scores[name]
        if not isinstance(tensor, torch.Tensor):
            raise ExplorerError(f"Scores of layer {name!r} must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.numel() == 0:
            raise ExplorerError(f"Layer {name!r} has no units to rank.")
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1).numpy()
        if not np.isfinite(flat).all():
            raise ExplorerError(
                f"Scores of layer {name!r} contain NaN or inf (or exceed float32 range); "
                "check the model's weights and calibration data, or choose another criterion."
            )
        dead = _dead_units(name, kept[name], tuple(tensor.shape)) if name in kept else None
        deads.append(dead if dead is not None and dead.any() else None)
        shapes.append(tuple(tensor.shape))
        flats.append(flat)
    sizes = np.array([flat.size for flat in flats], dtype=np.int64)
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    if total >= 1 << _INDEX_BITS:
        raise ExplorerError(f"{total} units are too many to rank (limit {1 << _INDEX_BITS}); use channel scores.")

    keys = _pack_keys(flats, offsets, deads)
    for layer in range(len(names)):
        keys[offsets[layer]:offsets[layer + 1]].sort()
    grid_keys = _grid_keys(keys, offsets)
    grid_counts = np.stack(
        [np.searchsorted(keys[offsets[layer]:offsets[layer + 1]], grid_keys) for layer in range(len(names))]
    ).astype(np.int64)
    return Ranking(
        names=names,
        shapes=tuple(shapes),
        sizes=sizes,
        offsets=offsets,
        layer_keys=keys,
        grid_counts=grid_counts,
        already_pruned=np.array([0 if dead is None else int(dead.sum()) for dead in deads], dtype=np.int64),
    )


def _dead_units(name: str, mask: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Layer ``name``'s already-pruned units as a flat boolean array, the mask checked against its scores' shape."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ExplorerError(
            f"The current mask of layer {name!r} is {got}; expected shape {shape}, the shape of its scores "
            "(explorer.masking.kept_units turns weight masks into channel masks)."
        )
    return torch.logical_not(mask.detach().to("cpu").reshape(-1)).numpy()


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ExplorerError(f"{what} must be a number between 0 and 1, got {value!r}.")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ExplorerError(f"{what} must be between 0 and 1, got {value}.")
    return value


def _units_kept_at_least(min_keep: float, size: int) -> int:
    """ceil(min_keep · size), forgiving float noise such as 0.05 · 100 = 5.000000000000001."""
    return min(size, math.ceil(min_keep * size - 1e-9))


def plan(
    ranking: Ranking,
    sparsity: float,
    scope: str = "local",
    *,
    overrides: Mapping[str, float] | None = None,
    protect: Iterable[str] = (),
    min_keep: float = 0.0,
) -> Plan:
    """Decide how many units each layer loses; each layer always loses its lowest-scored ones.

    * ``scope="local"``: every layer prunes ``round(S · n_l)`` of its ``n_l`` units.
    * ``scope="global"``: exactly ``round(S · N)`` of the ``N`` units in the pool, wherever
      they are, so low-scored layers lose more and may *collapse* (keep nothing).
    * ``overrides={"layer": s}`` gives a layer its own sparsity (ranked within the layer)
      and takes it out of the pool; ``protect`` is the same with ``s = 0`` (and wins over
      an override of the same layer).
    * ``min_keep`` (fraction): every pool layer keeps at least ``ceil(min_keep · n_l)``
      units; in global scope the units it may not lose are taken from other layers, so the
      total is still ``round(S · N)`` when possible (else ``target_met`` is False).
    * Units the current mask pruned (``prepare(..., kept=...)``) stay pruned in every rule,
      protect included: a layer loses at least them, then its lowest-scored live units. Below
      the current sparsity the plan prunes more than asked (``target_met`` False); to let
      units grow back, choose them yourself and call :func:`explorer.masking.set_masks`.

    ``round`` is Python's (half to even), as in ``torch.nn.utils.prune``.
    """
    sparsity = _check_fraction(sparsity, "Sparsity")
    min_keep = _check_fraction(min_keep, "min_keep")
    if scope not in SCOPES:
        raise ExplorerError(f"Unknown scope {scope!r}; choose one of {', '.join(SCOPES)}.")
    if isinstance(protect, str):
        protect = [protect]
    protected = list(dict.fromkeys(protect))
    override_values = {
        name: _check_fraction(value, f"Override sparsity of {name!r}") for name, value in (overrides or {}).items()
    }
    for name in [*override_values, *protected]:
        ranking.index_of(name)
    requested_overrides = dict(override_values)
    override_values.update({name: 0.0 for name in protected})

    sizes = [int(size) for size in ranking.sizes]
    already = [int(count) for count in ranking.already_pruned]
    pool = [layer for layer, name in enumerate(ranking.names) if name not in override_values]
    floors = {layer: _units_kept_at_least(min_keep, sizes[layer]) for layer in pool}
    pool_total = sum(sizes[layer] for layer in pool)
    pruned = [0] * len(sizes)
    sources = ["global" if scope == "global" else "local"] * len(sizes)
    for name, value in override_values.items():
        layer = ranking.index_of(name)
        pruned[layer] = max(already[layer], round(value * sizes[layer]))
        sources[layer] = "protected" if name in protected else "override"

    notes = []
    if scope == "local":
        wanted = {layer: round(sparsity * sizes[layer]) for layer in pool}
        for layer in pool:
            pruned[layer] = max(already[layer], min(wanted[layer], sizes[layer] - floors[layer]))
        if any(pruned[layer] < wanted[layer] for layer in pool):
            notes.append(f"min_keep={min_keep} capped some layers below the requested sparsity.")
        if any(pruned[layer] > wanted[layer] for layer in pool):
            notes.append("The current mask already prunes more than requested in some layers; plans never revive "
                         "pruned units (regrow them with explorer.masking.set_masks).")
    else:
        target = round(sparsity * pool_total)
        caps = {layer: max(already[layer], sizes[layer] - floors[layer]) for layer in pool}
        if ranking.layer_keys.size != ranking.total:  # a lean ranking: its order counts, or nothing can
            if ranking.order is None or min_keep:
                raise ExplorerError("Global scope ranks every weight across layers, and this preparation holds each "
                                    "layer's size only (a lean preparation"
                                    f"{', which cannot honour min_keep' if ranking.order is not None else ''}): plan "
                                    "with local scope, or prepare without lean.")
            counts = ranking.order.counts([ranking.names[layer] for layer in pool], target)
            for layer in pool:
                pruned[layer] = counts[ranking.names[layer]]
            achieved = sum(pruned[layer] for layer in pool)
        else:
            achieved = _global_counts(ranking, pool, caps, target, pruned)
        for layer in pool:
            pruned[layer] = max(already[layer], pruned[layer])
        already_pool = sum(already[layer] for layer in pool)
        if achieved < target:
            notes.append(
                f"min_keep={min_keep} leaves only {achieved} prunable units in the pool; "
                f"pruned {achieved} instead of the requested {target}."
            )
        elif already_pool > target:
            notes.append(
                f"The current mask already prunes {already_pool} units of the pool, more than the requested "
                f"{target}; plans never revive pruned units (regrow them with explorer.masking.set_masks)."
            )
    target_met, note = not notes, " ".join(notes)

    layer_plans = [
        LayerPlan(
            name=name,
            total=sizes[layer],
            kept=sizes[layer] - pruned[layer],
            pruned=pruned[layer],
            sparsity=pruned[layer] / sizes[layer],
            collapsed=pruned[layer] == sizes[layer],
            source=sources[layer],
        )
        for layer, name in enumerate(ranking.names)
    ]
    total_pruned = sum(pruned)
    collapse_point, collapse_layer = _collapse_point(ranking, pool, scope, min_keep)
    return Plan(
        scope=scope,
        sparsity_requested=sparsity,
        sparsity_actual=total_pruned / ranking.total,
        total=ranking.total,
        pruned=total_pruned,
        layers=layer_plans,
        collapsed=[lp.name for lp in layer_plans if lp.collapsed],
        collapse_point=collapse_point,
        collapse_layer=collapse_layer,
        min_keep=min_keep,
        overrides=requested_overrides,
        protected=protected,
        target_met=target_met,
        note=note,
    )


def _global_counts(ranking: Ranking, pool: list[int], caps: dict[int, int], target: int, pruned: list[int]) -> int:
    """Fill ``pruned`` for the pool layers with the ``target`` lowest pool units; return the count.

    Walk the global order and let each unit in: it counts if its layer is in the pool and
    still under its cap. The capped count rises by at most one per unit, so the first cut
    where it reaches ``target`` is exact. The grid of per-layer counts made by
    :func:`prepare` locates the bracket holding that cut with arithmetic on a small
    matrix; only the few thousand units inside the bracket are then sorted and walked.
    """
    if not pool:
        return 0
    layer_caps = np.array([caps[layer] for layer in pool], dtype=np.int64)
    grid = ranking.grid_counts[pool]
    capped_totals = np.minimum(grid, layer_caps[:, None]).sum(axis=0)
    if capped_totals[-1] < target:
        counts = grid[:, -1]
    else:
        column = int(np.argmax(capped_totals >= target))
        counts = grid[:, column].copy()
        if column > 0:
            counts = grid[:, column - 1].copy()
            slices = [
                ranking.keys_of(layer)[counts[row]:grid[row, column]] for row, layer in enumerate(pool)
            ]
            lengths = np.array([piece.size for piece in slices], dtype=np.int64)
            starts = np.cumsum(lengths) - lengths
            order = np.argsort(np.concatenate(slices))
            rows = np.repeat(np.arange(len(pool)), lengths)[order]
            occurrence = (np.arange(order.size) - np.repeat(starts, lengths))[order]
            counted = counts[rows] + occurrence < layer_caps[rows]
            reached = capped_totals[column - 1] + np.cumsum(counted)
            last = int(np.argmax(reached >= target))
            counts += np.bincount(rows[: last + 1], minlength=len(pool))
    counts = np.minimum(counts, layer_caps)
    for row, layer in enumerate(pool):
        pruned[layer] = int(counts[row])
    return int(counts.sum())


def _collapse_point(ranking: Ranking, pool: list[int], scope: str, min_keep: float) -> tuple[float | None, str | None]:
    """Smallest pruned fraction of the pool at which some pool layer empties.

    Global: a layer is empty once its highest-ranked unit is pruned; if that unit has
    0-based rank ``r`` in the pool's order, that happens at ``k = r + 1`` pruned units,
    i.e. at fraction ``(r + 1) / N_pool``; the layer whose best unit ranks lowest goes
    first. Local: ``round(S · n) = n`` needs ``S >= 1 - 0.5 / n``, so the largest layer
    holds out longest and the smallest layer collapses first at that bound. A layer the
    current mask has already emptied is collapsed at any sparsity: 0.0.
    """
    emptied = [layer for layer in pool if ranking.already_pruned[layer] == ranking.sizes[layer]]
    if emptied:
        return 0.0, ranking.names[emptied[0]]
    if not pool or _units_kept_at_least(min_keep, 1) > 0:
        return None, None
    if scope == "local":
        first = min(pool, key=lambda layer: (1 - 0.5 / ranking.sizes[layer], layer))
        return 1 - 0.5 / float(ranking.sizes[first]), ranking.names[first]
    if ranking.layer_keys.size != ranking.total:
        return ranking.order.collapse([ranking.names[layer] for layer in pool])
    first = min(pool, key=lambda layer: ranking.keys_of(layer)[-1])
    best_key = ranking.keys_of(first)[-1]
    rank = sum(ranking.count_below(layer, best_key) for layer in pool)
    pool_total = sum(int(ranking.sizes[layer]) for layer in pool)
    return (rank + 1) / pool_total, ranking.names[first]


def round_kept(plan: Plan, multiple: int, ranking: Ranking | None = None) -> Plan:
    """The plan with each pruned layer's kept units rounded to the nearest ``multiple`` (8, 16, 32 ...).

    Hardware prefers channel counts divisible by its vector width or tile (oneDNN's 8/16 floats,
    tensor cores' 8/16 halves): 61 kept channels can run slower than 64. A layer that loses nothing,
    or has fewer units than ``multiple``, is left alone; no layer is rounded to zero (it keeps at least
    ``multiple``); a layer whose nearest multiple exceeds its size keeps all its units; units the current
    mask pruned (``ranking``) stay pruned.
    ``sparsity_actual`` moves accordingly and ``note`` says so.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ExplorerError(f"Round kept channels to a whole number >= 1 (8, 16, 32), got {multiple!r}.")
    if multiple == 1:
        return plan
    already = {name: int(ranking.already_pruned[ranking.index_of(name)]) for name in ranking.names} if ranking else {}
    layers = []
    for lp in plan.layers:
        kept = lp.kept
        if lp.pruned and lp.total >= multiple:  # nearest multiple; past what may be kept, all that may be
            kept = min(lp.total - already.get(lp.name, 0), max(multiple, multiple * round(lp.kept / multiple)))
        layers.append(LayerPlan(name=lp.name, total=lp.total, kept=kept, pruned=lp.total - kept,
                                sparsity=(lp.total - kept) / lp.total, collapsed=kept == 0, source=lp.source))
    pruned = sum(lp.pruned for lp in layers)
    note = f"Kept units rounded to multiples of {multiple} in every pruned layer of at least {multiple}."
    return replace(plan, layers=layers, pruned=pruned, sparsity_actual=pruned / plan.total,
                   collapsed=[lp.name for lp in layers if lp.collapsed],
                   note=" ".join(filter(None, [plan.note, note])))


def pruned_indices(ranking: Ranking, plan: Plan, layer: str) -> torch.Tensor:
    """Flat indices of ``layer``'s pruned units: its ``pruned`` lowest in its own stable order.

    In global scope the units a layer loses are exactly its lowest-scored ones (the global
    cut is a score threshold), so this is consistent for both scopes.
    """
    index = ranking.index_of(layer)
    layer_plan = plan.layer(layer)
    if layer_plan.total != int(ranking.sizes[index]):
        raise ExplorerError(
            f"The plan's layer {layer!r} has {layer_plan.total} units but the ranking has "
            f"{int(ranking.sizes[index])}: the plan was made from a different ranking."
        )
    return torch.from_numpy(ranking.units(index, 0, layer_plan.pruned))
