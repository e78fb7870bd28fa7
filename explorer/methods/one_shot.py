"""One-shot pruning: prune once to the target, then fine-tune with the whole budget."""
from __future__ import annotations

from torch import nn

from explorer.methods.base import Method, MethodRun


class OneShot(Method):
    """Prune once, then fine-tune (the classic recipe; Han et al. 2015 without iterations).

    The start model (a trained network) is scored once, the plan removes the target fraction
    in one cut, and the whole training budget goes to fine-tuning the pruned copy. Cheap and a
    good default at moderate sparsity; at high sparsity the single cut removes weights the
    network still relied on, which iterative and gradual pruning avoid by cutting in steps.
    """

    name = "one_shot"
    summary = "prune once to the target, then fine-tune with the whole budget"
    needs_training = False

    def run(self, ctx: MethodRun, params) -> nn.Module:
        pruned = ctx.prune(ctx.model, ctx.target)
        ctx.record(pruned, event="prune")
        if ctx.epochs and not ctx.cancelled:
            pruned = ctx.train(pruned, ctx.epochs).model
        return pruned
