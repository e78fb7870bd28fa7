"""Pruning at initialisation: choose the sparse network before any training, then train only it."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from explorer.errors import ExplorerError
from explorer.methods.base import Method, MethodRun

INIT_CRITERIA = ("snip", "synflow", "random", "magnitude")
DEFAULT_ROUNDS = {"synflow": 100}  # every other criterion: 1 (single shot, as its paper prunes)


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Sparsity after each round: ``1 − (1 − target) ** (r / rounds)`` for r = 1 .. rounds.

    The density shrinks by the same factor every round (Tanaka et al. 2020's exponential
    schedule), so early rounds remove many weights and late rounds few; the last is ``target``.

    >>> [round(s, 3) for s in sparsity_schedule(0.99, 2)]
    [0.9, 0.99]
    """
    return [1.0 - (1.0 - target) ** (r / rounds) for r in range(1, rounds)] + [target]


@dataclass(frozen=True)
class AtInitParams:
    """``rounds``: prunes on the exponential schedule; left out, 100 for synflow and 1 otherwise."""

    rounds: int | None = None

    def validate(self) -> "AtInitParams":
        if self.rounds is not None and (isinstance(self.rounds, bool) or not isinstance(self.rounds, int)
                                        or self.rounds < 1):
            raise ExplorerError(f"recipe: method.rounds must be an integer >= 1 (or left out: 100 for synflow, "
                                f"1 otherwise), got {self.rounds!r}.")
        return self

    def rounds_for(self, criterion: str) -> int:
        return self.rounds if self.rounds is not None else DEFAULT_ROUNDS.get(criterion, 1)


class AtInit(Method):
    """Prune at initialisation, then train the sparse network with its mask fixed for the whole budget.

    Fresh weights are scored by the recipe's criterion before any training: SNIP's connection
    sensitivity |w · ∂L/∂w| on a few batches (Lee et al. 2019), SynFlow's data-free synaptic
    flow |w · ∂R/∂w| (Tanaka et al. 2020), magnitude |w| or random (the baselines either must
    beat). The mask is then fixed and the whole budget trains the sparse network. Cheap: no
    dense training at all. Scored in one shot, a global ranking can empty a whole layer at high
    sparsity (layer collapse): the flow through a wide layer looks small per weight. Iterative
    SynFlow re-scores the masked network over ``rounds`` prunes, density
    ``(1 − target) ** (r / rounds)`` after round r, and the re-scoring makes the flow through a
    thinned layer look large, so no layer is emptied before the network is.
    """

    name = "at_init"
    summary = "prune fresh weights (snip, synflow, random or magnitude), then train with the mask fixed"
    structures = ("unstructured",)
    from_scratch = True
    Params = AtInitParams

    def run(self, ctx: MethodRun, params: AtInitParams) -> nn.Module:
        criterion = ctx.scoring.criterion
        if criterion not in INIT_CRITERIA:
            raise ExplorerError(f"Method 'at_init' scores fresh weights with {', '.join(INIT_CRITERIA)}; "
                                f"'{criterion}' needs trained weights: change scoring.criterion or the method.")
        rounds = params.rounds_for(criterion)
        model = ctx.fresh_model(ctx.seed)
        for index, sparsity in enumerate(sparsity_schedule(ctx.target, rounds), start=1):
            if ctx.cancelled:
                return model
            ctx.report(0.0, f"{criterion} at initialisation: round {index}/{rounds}, sparsity {sparsity:.1%}")
            model = ctx.prune(model, sparsity)  # a masked model: its pruned weights stay pruned
            ctx.record(model, event="prune" if index == rounds else "round")
        return ctx.train(model, ctx.epochs).model
