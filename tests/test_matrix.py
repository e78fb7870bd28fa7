"""Every zoo model x structure x criterion through the whole chain: scores, plan, pruned copy, forward.

Each cell asserts invariants that hold whatever the numbers are: scores finite and not
degenerate (not one value for the whole model, no layer of exact zeros unless its weights are
zero), ``pipeline.prepare -> preview (30 %, local) -> apply`` gives a model whose forward pass
has the right output shape, channel pruning removes parameters, unstructured pruning zeroes
the planned weights, and the model passed in is untouched.
"""
import copy

import pytest
import torch
from torch import nn

from explorer import criteria, pipeline
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.layers import effective_weight, prunable_layers
from explorer.specs import PlanSpec, ScoringSpec
from explorer.zoo import ZOO, build

STRUCTURES = ("unstructured", "channel")
CALIBRATION = dict(calib_batches=1, calib_batch_size=8)  # enough to tell units apart; conductance costs 17 passes


@pytest.fixture(scope="module")
def zoo_models():
    """One fresh model per zoo entry on its usual dataset, built once for the module.

    Fresh BatchNorm has γ = 1, β = 0, μ = 0, σ² = 1 everywhere, which makes bn_scale
    legitimately flat (every channel ties) and BN an identity; random affine parameters and
    running statistics give every criterion something to tell apart, as a trained net would.
    """
    models = {}
    for name, entry in ZOO.items():
        dataset = load_dataset(entry.default_dataset)
        torch.manual_seed(0)
        model = build(name, dataset.input_shape, dataset.num_classes).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    module.weight.uniform_(-2, 2)
                    module.bias.uniform_(-0.5, 0.5)
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2)
        models[name] = (model, dataset)
    return models


def assert_scores_informative(model, scores):
    layers = dict(prunable_layers(model))
    values = torch.cat([score.flatten() for score in scores.values()])
    assert torch.isfinite(values).all()
    assert values.min() < values.max(), "every unit of the model has the same score"
    for name, score in scores.items():
        if not score.any():
            assert not layers[name].weight.any(), f"layer {name} scored all zero but its weights are not"


@pytest.mark.parametrize("criterion", list(criteria.CRITERIA))
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("model_name", list(ZOO))
def test_cell(zoo_models, model_name, structure, criterion):
    model, dataset = zoo_models[model_name]
    if (structure, criterion) == ("channel", "sparsegpt"):  # single weights only, said in one line
        with pytest.raises(ExplorerError, match="unstructured or nm"):
            pipeline.prepare(model, ScoringSpec(structure=structure, criterion=criterion, **CALIBRATION),
                             dataset=dataset)
        return
    before = copy.deepcopy(model.state_dict())
    scoring = ScoringSpec(structure=structure, criterion=criterion, **CALIBRATION)
    prepared = pipeline.prepare(model, scoring, dataset=dataset, seed=0)
    assert_scores_informative(model, prepared.scores)

    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.3, scope="local"))
    assert plan.pruned > 0 and not plan.collapsed
    pruned = pipeline.apply(model, prepared, plan)
    example = dataset.example_input(4)
    with torch.no_grad():
        assert pruned.eval()(example).shape == (4, dataset.num_classes)

    if structure == "channel":
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    else:
        zeros = sum(int((effective_weight(module) == 0).sum()) for _, module in prunable_layers(pruned))
        assert zeros >= plan.pruned
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} of the model passed in changed"
