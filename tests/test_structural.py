"""Physical channel removal: groups, real parameter counts, unchanged outputs, errors."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from explorer import planner, structural
from explorer.errors import ExplorerError


class ConvStack(nn.Module):
    """(a) plain conv+BN stack with a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """(b) a stem and two residual blocks (add) sharing the stem's channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a1, self.a1_bn = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.a2, self.a2_bn = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1, self.b1_bn = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.b2, self.b2_bn = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.a2_bn(self.a2(torch.relu(self.a1_bn(self.a1(x))))))
        x = torch.relu(x + self.b2_bn(self.b2(torch.relu(self.b1_bn(self.b1(x))))))
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """(c) two branches concatenated, then a 1x1 conv and an MLP head."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 6, 3, padding=1)
        self.merge = nn.Conv2d(10, 7, 1)
        self.hidden = nn.Linear(7, 9)
        self.fc = nn.Linear(9, 3)

    def forward(self, x):
        x = torch.relu(torch.cat([self.left(x), self.right(x)], dim=1))
        x = torch.relu(self.merge(x)).mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


class InvertedResidual(nn.Module):
    """(d) MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1, residual add."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.expand_bn = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.dw_bn = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.project, self.project_bn = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.expand_bn(self.expand(x)))
        y = torch.relu(self.dw_bn(self.dw(y)))
        x = x + self.project_bn(self.project(y))
        return self.fc(x.mean((2, 3)))


MODELS = [ConvStack, Residual, Concat, InvertedResidual]
EXAMPLE = torch.randn(2, 3, 8, 8)


def _trained_like(model_class, seed=0):
    """A model with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = model_class()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    return model.eval()


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _silence(model, group, units):
    """Make the group's channels output exactly zero: filters, biases and BN affine."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for member in group.members:
            if member.cut != "out":
                continue
            idxs = [i for i, u in zip(member.idxs, member.units) if u in set(units)]
            layer = modules[member.layer]
            layer.weight[idxs] = 0
            if layer.bias is not None:
                layer.bias[idxs] = 0


@pytest.mark.parametrize("model_class", MODELS)
def test_removing_silent_channels_keeps_outputs(model_class):
    model = _trained_like(model_class)
    groups = structural.channel_groups(model, EXAMPLE)
    request = {g.name: torch.tensor(list(range(0, g.channels, 2))) for g in groups}
    for group in groups:
        _silence(model, group, request[group.name].tolist())
    pruned = structural.apply(model, request, EXAMPLE)
    assert _params(pruned) < _params(model)
    torch.testing.assert_close(pruned(EXAMPLE), model(EXAMPLE), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_class", MODELS)
def test_pruned_model_runs_forward_and_backward(model_class):
    model = _trained_like(model_class)
    model.train()
    groups = structural.channel_groups(model, EXAMPLE)
    generator = torch.Generator().manual_seed(1)
    request = {g.name: torch.randperm(g.channels, generator=generator)[: g.channels // 2] for g in groups}
    pruned = structural.apply(model, request, EXAMPLE)
    assert pruned.training, "train/eval flags are those of the input model"
    output = pruned(torch.randn(3, 3, 8, 8))
    output.sum().backward()
    assert all(p.grad is not None for p in pruned.parameters())
    assert output.shape == (3, model.fc.out_features)


@pytest.mark.parametrize("model_class", MODELS)
def test_real_params_per_channel_match_removing_one_channel(model_class):
    model = _trained_like(model_class)
    for group in structural.channel_groups(model, EXAMPLE):
        pruned = structural.apply(model, {group.name: torch.tensor([0])}, EXAMPLE)
        assert _params(model) - _params(pruned) == group.params_per_channel_real, group.name
        root = dict(model.named_modules())[group.name]
        naive = root.weight[0].numel() + (0 if root.bias is None else 1)
        assert group.params_per_channel_naive == naive


def test_residual_groups_couple_the_added_layers():
    model = _trained_like(Residual)
    groups = {g.name: g for g in structural.channel_groups(model, EXAMPLE)}
    assert set(groups) == {"stem", "a1", "b1"}
    trunk = groups["stem"]
    assert trunk.kind == "residual-coupled"
    assert set(trunk.out_layers()) == {"stem", "stem_bn", "a2", "a2_bn", "b2", "b2_bn"}
    assert {m.layer for m in trunk.members if m.cut == "in"} == {"a1", "b1", "fc"}
    assert structural.group_of(list(groups.values()), "a2") is trunk
    assert groups["a1"].kind == "conv"
    assert {m.layer for m in groups["a1"].members} == {"a1", "a1_bn", "a2"}
    # One trunk channel: 3 filters of 8·9 (stem 3·9), 3 BN pairs, inputs of a1, b1 (6·9) and fc (4).
    assert trunk.params_per_channel_real == 3 * 9 + 2 * 6 * 9 + 3 * 2 + 2 * 6 * 9 + 4


def test_depthwise_is_coupled_with_its_producer():
    model = _trained_like(InvertedResidual)
    groups = {g.name: g for g in structural.channel_groups(model, EXAMPLE)}
    expand = groups["expand"]
    assert expand.kind == "depthwise"
    assert {"expand", "dw", "dw_bn", "expand_bn"} <= set(expand.out_layers())
    assert "dw" not in groups, "the depthwise conv is not a group of its own"
    assert groups["stem"].kind == "residual-coupled"


def test_concat_members_carry_offsets():
    model = _trained_like(Concat)
    groups = {g.name: g for g in structural.channel_groups(model, EXAMPLE)}
    assert set(groups) == {"left", "right", "merge", "hidden"}
    merge_in = [m for m in groups["right"].members if m.layer == "merge"][0]
    assert merge_in.cut == "in" and merge_in.idxs == list(range(4, 10))
    pruned = structural.apply(model, {"left": [1, 3], "right": [0, 5]}, EXAMPLE)
    assert pruned.merge.in_channels == 6
    kept = [0, 2, 5, 6, 7, 8]  # left keeps 0, 2; right keeps 1..4, at offset 4
    torch.testing.assert_close(pruned.merge.weight, model.merge.weight[:, kept])


@pytest.mark.parametrize("model_class", MODELS)
def test_classifier_outputs_are_never_removed(model_class):
    model = _trained_like(model_class)
    groups = structural.channel_groups(model, EXAMPLE)
    assert structural.group_of(groups, "fc") is None
    assert all("fc" not in g.out_layers() for g in groups)
    with pytest.raises(ExplorerError, match="not a prunable channel group"):
        structural.apply(model, {"fc": [0]}, EXAMPLE)


def test_emptying_a_layer_is_refused_with_advice():
    model = _trained_like(ConvStack)
    with pytest.raises(ExplorerError, match="layer conv1 would be emptied: lower sparsity, use local scope or min_keep"):
        structural.apply(model, {"conv1": torch.arange(8)}, EXAMPLE)
    with pytest.raises(ExplorerError, match="out of range"):
        structural.apply(model, {"conv1": [8]}, EXAMPLE)


def test_emptying_through_partial_coupling_is_refused():
    model = _trained_like(Concat)
    # left's 4 channels are also merge's inputs 0..3; emptying left is refused.
    with pytest.raises(ExplorerError, match="layer left would be emptied"):
        structural.apply(model, {"left": [0, 1, 2, 3]}, EXAMPLE)


def test_input_model_is_not_modified():
    model = _trained_like(Residual)
    model.train()
    before = copy.deepcopy(model.state_dict())
    structural.channel_groups(model, EXAMPLE)
    structural.apply(model, {"stem": [0, 1]}, EXAMPLE)
    assert model.training and model.stem.out_channels == 8
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_groups_are_json_serialisable():
    groups = structural.channel_groups(_trained_like(InvertedResidual), EXAMPLE)
    text = json.dumps([g.to_dict() for g in groups])
    assert "params_per_channel_real" in text


def test_group_scores_mean_over_coupled_layers():
    model = _trained_like(Residual)
    groups = structural.channel_groups(model, EXAMPLE)
    scores = {name: torch.arange(1.0, m.out_channels + 1) * (k + 1)
              for k, (name, m) in enumerate(model.named_modules()) if isinstance(m, nn.Conv2d)}
    raw = structural.group_scores(model, groups, scores, normalize=False)
    expected = (scores["stem"] + scores["a2"] + scores["b2"]) / 3
    torch.testing.assert_close(raw["stem"], expected)
    normalised = structural.group_scores(model, groups, scores)
    # every layer's scores are proportional to 1..8, so each normalises to the same vector
    torch.testing.assert_close(normalised["stem"], torch.arange(1.0, 9) / 4.5)
    assert structural.group_scores(model, groups, scores, reduce="max", normalize=False)["stem"][0] == scores["b2"][0]


def test_group_scores_follow_concat_offsets():
    model = _trained_like(InvertedResidual)
    groups = structural.channel_groups(model, EXAMPLE)
    scores = {n: torch.rand(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    scores["fc"] = torch.rand(3)
    merged = structural.group_scores(model, groups, scores, normalize=False)
    torch.testing.assert_close(merged["expand"], (scores["expand"] + scores["dw"]) / 2)
    with pytest.raises(ExplorerError, match="no channel scores"):
        structural.group_scores(model, groups, {"fc": torch.rand(3)})
    with pytest.raises(ExplorerError, match="channels but"):
        structural.group_scores(model, groups, {**scores, "expand": torch.rand(5)})


def test_untraceable_model_gives_actionable_error():
    with pytest.raises(ExplorerError, match="could not trace"):
        structural.channel_groups(ConvStack(), torch.randn(2, 5, 8, 8))


def test_apply_plan_through_planner_local_scope():
    model = _trained_like(Residual)
    groups = structural.channel_groups(model, EXAMPLE)
    scores = {n: m.weight.detach().abs().flatten(1).sum(1) for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d)}
    ranking = planner.prepare(structural.group_scores(model, groups, scores))
    half = planner.plan(ranking, 0.5, "local")
    pruned = structural.apply_plan(model, half, ranking, EXAMPLE)
    assert pruned.stem.out_channels == 4 and pruned.a1.out_channels == 3
    pruned(EXAMPLE).sum().backward()
