"""Methods that prune in rounds: iterative pruning, learning-rate rewinding and lottery tickets.

All three cut the network in ``rounds`` steps instead of one and train between the cuts. Round
r of k reaches ``1 - (1 - f)^r`` of the start model's weights with ``f = 1 - (1 - target)^(1/k)``:
every round removes the same fraction f of what survived the round before, and round k reaches
the target exactly. The training budget is split evenly over the rounds, the remainder going to
the last ones (8 epochs in 3 rounds: 2, 3, 3), so every method spends the same training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from explorer.errors import ExplorerError
from explorer.layers import clone_model, effective_weight, original_of, prunable_layers, weight_name
from explorer.methods.base import Method, MethodRun
from explorer.train import Callback, TrainState, lr_at


def round_sparsity(target: float, round_index: int, rounds: int) -> float:
    """Sparsity after round ``round_index`` (1-based) of ``rounds``: ``1 - (1 - f)^r``, ``f = 1 - (1 - target)^(1/k)``.

    >>> round(round_sparsity(0.875, 1, 3), 6), round_sparsity(0.875, 3, 3)
    (0.5, 0.875)
    """
    if round_index >= rounds:
        return target  # exactly, not up to rounding of the power
    per_round = 1.0 - (1.0 - target) ** (1.0 / rounds)
    return 1.0 - (1.0 - per_round) ** round_index


def split_budget(epochs: int, parts: int) -> list[int]:
    """``epochs`` split into ``parts`` near-equal shares, the remainder to the last ones.

    >>> split_budget(8, 3)
    [2, 3, 3]
    """
    base, extra = divmod(epochs, parts)
    return [base] * (parts - extra) + [base + 1] * extra


def _method_fail(name: str, message: str) -> ExplorerError:
    return ExplorerError(f"recipe: method.{name} {message}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _method_fail(name, f"must be an integer >= {minimum}, got {value!r}.")


def _round_shares(ctx: MethodRun, method: str, rounds: int) -> list[int]:
    """The budget split over the rounds; every round must get at least one epoch of training."""
    if rounds > ctx.epochs:
        raise ExplorerError(f"Method '{method}' trains in every round: method.rounds {rounds} needs budget.epochs "
                            f">= {rounds}, got {ctx.epochs}; raise the budget or lower the rounds.")
    return split_budget(ctx.epochs, rounds)


@dataclass(frozen=True)
class RoundsParams:
    """``rounds``: how many cuts (each followed by fine-tuning) reach the target."""

    rounds: int = 3

    def validate(self) -> "RoundsParams":
        _check_int("rounds", self.rounds, 1)
        return self


class Iterative(Method):
    """Iterative pruning: k rounds of prune, then fine-tune (Han et al., 2015, "Learning both weights and connections").

    Each round scores the current network, removes the weakest fraction f of the weights (or
    channels) still there and fine-tunes with its share of the budget, so round r stands at
    sparsity ``1 - (1 - f)^r`` with ``f = 1 - (1 - target)^(1/k)`` and round k at the target.
    A pruned unit stays pruned. Smaller cuts let the network recover between them, which keeps
    more accuracy than one cut at high sparsity; the price is k scorings instead of one.
    Trajectory: a ``prune`` point after each cut, ``epoch`` points while fine-tuning.
    """

    name = "iterative"
    summary = "k rounds of prune then fine-tune; each round removes the same fraction of what is left"
    Params = RoundsParams

    def run(self, ctx: MethodRun, params: RoundsParams) -> nn.Module:
        shares = _round_shares(ctx, self.name, params.rounds)
        model = clone_model(ctx.model)
        for round_index, epochs in enumerate(shares, start=1):
            if ctx.cancelled:
                break
            model = ctx.prune(model, round_sparsity(ctx.target, round_index, params.rounds))
            ctx.record(model, event="prune")
            model = ctx.train(model, epochs).model
        return model


@dataclass(frozen=True)
class LrRewindingParams:
    """``rewind_epoch``: the epoch of the schedule retraining restarts from; ``rounds``: cuts to the target."""

    rewind_epoch: int = 0
    rounds: int = 1

    def validate(self) -> "LrRewindingParams":
        _check_int("rewind_epoch", self.rewind_epoch, 0)
        _check_int("rounds", self.rounds, 1)
        return self


class LrRewinding(Method):
    """Learning-rate rewinding: retrain with the original schedule, not a small constant rate (Renda et al., 2020).

    Renda, Frankle & Carbin ("Comparing rewinding and fine-tuning in neural network pruning")
    prune a network trained for T epochs, then retrain it for T - t epochs with the learning
    rates the original run had from epoch t on: large again, then decaying. Fine-tuning at the
    final, small rate recovers less. Here the original schedule is the recipe's training
    settings over the budget E (``budget.epochs``), and retraining replays its epochs
    ``rewind_epoch`` .. E - 1 (``train(..., start_step=rewind_epoch * steps_per_epoch)``), so the
    rates are exactly ``lr_at(schedule, step)``. With ``rounds`` k > 1 each round (cut at
    ``1 - (1 - f)^r`` as in iterative pruning) is that protocol in miniature: the budget is split
    into k shares and round r replays its own share's schedule from ``rewind_epoch``. So the
    total stays within the budget: E - k * rewind_epoch epochs are spent, the rest is left
    unspent, as rewinding to t costs T - t in the paper. ``rewind_epoch`` must be below each
    share (E // k); 0 replays the whole schedule.
    """

    name = "lr_rewinding"
    summary = "prune, then retrain with the original learning-rate schedule replayed from the rewind epoch"
    Params = LrRewindingParams

    def run(self, ctx: MethodRun, params: LrRewindingParams) -> nn.Module:
        shares = _round_shares(ctx, self.name, params.rounds)
        if params.rewind_epoch >= min(shares):
            within = (f"the budget ({ctx.epochs} epochs)" if params.rounds == 1 else
                      f"each round's schedule (budget.epochs {ctx.epochs} // rounds {params.rounds} = {min(shares)})")
            raise _method_fail("rewind_epoch", f"must be below {within}: replaying from epoch "
                                               f"{params.rewind_epoch} leaves nothing to retrain.")
        start_step = params.rewind_epoch * ctx.steps_per_epoch
        model = clone_model(ctx.model)
        for round_index, epochs in enumerate(shares, start=1):
            if ctx.cancelled:
                break
            model = ctx.prune(model, round_sparsity(ctx.target, round_index, params.rounds))
            schedule = dataclasses.replace(ctx.config, epochs=epochs)
            ctx.record(model, event="prune", lr=lr_at(schedule, start_step, ctx.steps_per_epoch))
            model = ctx.train(model, epochs - params.rewind_epoch, config=schedule, start_step=start_step).model
        return model


@dataclass(frozen=True)
class LotteryTicketParams:
    """``rounds``: training rounds (the first trains the dense net); ``rewind_step``: the snapshot's step;
    ``reinit``: the random re-initialisation control."""

    rounds: int = 3
    rewind_step: int = 0
    reinit: bool = False

    def validate(self) -> "LotteryTicketParams":
        _check_int("rounds", self.rounds, 2)
        _check_int("rewind_step", self.rewind_step, 0)
        if not isinstance(self.reinit, bool):
            raise _method_fail("reinit", f"must be true or false, got {self.reinit!r}.")
        return self


class _Snapshot(Callback):
    """Keeps a copy of every parameter and buffer as they are after ``step`` optimiser steps."""

    def __init__(self, step: int):
        self.step = step
        self.weights: dict[str, torch.Tensor] | None = None

    def on_step_start(self, state: TrainState) -> None:
        if state.global_step == self.step:
            self.weights = {key: value.detach().clone() for key, value in state.model.state_dict().items()}


def rewind(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Reset ``model`` in place to the dense ``weights`` (a state dict), keeping its masks.

    A masked layer's ``weight_orig`` takes the snapshot's ``weight``, so its surviving weights
    equal the snapshot and its pruned ones stay zero; biases and buffers are reset too.
    """
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("_mask"):
            state[key] = value
        else:
            state[key] = weights[key] if key in weights else weights[key.removesuffix("_orig")]
    model.load_state_dict(state)
    for _, module in prunable_layers(model):
        if original_of(module) is not None:
            setattr(module, weight_name(module), effective_weight(module))  # as the pruning hook sets it
    return model


class LotteryTicket(Method):
    """Lottery tickets: iterative magnitude pruning with weight rewinding (Frankle & Carbin, 2019).

    A dense network is trained from fresh weights, and its weights after ``rewind_step`` steps
    are kept (0: the initialisation; a few hundred steps in: late rewinding, Frankle et al.,
    2020, "Linear mode connectivity and the lottery ticket hypothesis", which finds tickets in
    deeper nets). After each round the lowest-magnitude surviving weights go (a fraction f of
    them, as in iterative pruning, over the ``rounds - 1`` cuts), the survivors are reset to
    the snapshot and the sparse net is trained again; the budget is split over the rounds, the
    first training the dense net. The claim: that sparse net, from those weights, trains as
    well as the dense one. ``reinit: true`` is the control the ticket must beat: the same
    final mask, but the last round starts from a fresh random draw (seed + 1), not the
    snapshot. Unstructured only, and ranked by magnitude only (other criteria are refused):
    the surviving large trained weights are the ticket. Trajectory: ``epoch`` points, then per
    round a ``prune`` point (trained weights cut) and a ``rewind`` (or ``reinit``) point.
    """

    name = "lottery_ticket"
    summary = "train, prune the smallest weights, rewind the survivors to early weights, retrain; repeat"
    structures = ("unstructured",)
    from_scratch = True
    Params = LotteryTicketParams

    def run(self, ctx: MethodRun, params: LotteryTicketParams) -> nn.Module:
        if ctx.scoring.criterion != "magnitude":
            raise ExplorerError(f"Method 'lottery_ticket' prunes by weight magnitude, not "
                                f"'{ctx.scoring.criterion}': set scoring.criterion to magnitude, or use "
                                "method 'iterative' for other criteria.")
        shares = _round_shares(ctx, self.name, params.rounds)
        first_steps = shares[0] * ctx.steps_per_epoch
        if params.rewind_step >= first_steps:
            raise _method_fail("rewind_step", f"must lie within the first round's training, 0 to {first_steps - 1} "
                                              f"({shares[0]} epochs x {ctx.steps_per_epoch} steps), got "
                                              f"{params.rewind_step}.")
        snapshot = _Snapshot(params.rewind_step)
        model = ctx.train(ctx.fresh_model(ctx.seed), shares[0], callbacks=[snapshot]).model
        cuts = params.rounds - 1
        for cut, epochs in enumerate(shares[1:], start=1):
            if ctx.cancelled or snapshot.weights is None:
                break
            model = ctx.prune(model, round_sparsity(ctx.target, cut, cuts))
            ctx.record(model, event="prune")
            if params.reinit and cut == cuts:
                rewind(model, ctx.fresh_model(ctx.seed + 1).state_dict())
                ctx.record(model, event="reinit")
            else:
                rewind(model, snapshot.weights)
                ctx.record(model, event="rewind")
            model = ctx.train(model, epochs).model
        return model
