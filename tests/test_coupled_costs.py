"""Coupled-group costs against a real removal: every group of every zoo model and built-in transformer.

A group's reported cost (``params_per_channel_real``, ``params_removed``) must equal what really goes
when its channels are removed through the project's own ``structural.apply``, counted by brute force
(the sum of ``numel`` over the model's parameters, before and after), for one channel and for several.
"""
import os

import pytest
import torch

from explorer import heads, hf, structural, zoo
from explorer.data import load_dataset
from explorer.errors import ExplorerError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _some_units(group, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(group.channels, generator=generator)[:count]


def _check_group(model, group, example, units_per_channel: int = 1, attention=None):
    """Remove 1 and then k > 1 units of ``group`` for real; the reported costs must match."""
    for count in sorted({1, min(3, group.channels // units_per_channel - 1)}):
        units = _some_units(group, count, seed=count) if attention is None else torch.arange(count)
        request = {group.name: units} if attention is None else heads.expand({group.name: units}, attention)
        pruned = structural.apply(model, request, example)
        if attention is not None:
            heads.fix_head_counts(pruned, attention)
        gone = _params(model) - _params(pruned)
        assert gone == group.params_removed(request[group.name]), (group.name, count)
        assert gone == count * units_per_channel * group.params_per_channel_real, (group.name, count)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_zoo_group_costs_what_a_real_removal_frees(name):
    dataset = load_dataset(zoo.ZOO[name].default_dataset)
    torch.manual_seed(0)
    model = zoo.build(name, dataset.input_shape, dataset.num_classes).eval()
    example = dataset.example_input(1)
    groups = structural.channel_groups(model, example)
    assert groups
    for group in groups:
        assert group.uniform(), group.name
        _check_group(model, group, example)


def test_lenet5_conv2_channel_frees_its_filter_and_the_four_fc1_inputs_after_the_flatten():
    model = zoo.build("lenet5", (1, 8, 8), 10).eval()
    conv2, fc1 = model.features.conv2, model.classifier.fc1
    positions = fc1.in_features // conv2.out_channels  # 2 x 2 on 8x8 digits
    assert positions == 4
    group = structural.group_of(structural.channel_groups(model, torch.zeros(1, 1, 8, 8)), "features.conv2")
    assert group.params_per_channel_real == conv2.weight[0].numel() + 1 + positions * fc1.out_features == 631
    assert group.params_per_channel_naive == 151
    fc1_member = next(m for m in group.members if m.layer == "classifier.fc1")
    assert fc1_member.channels == fc1.in_features and fc1_member.params_per_channel == fc1.out_features


class TrunkAndBranches(torch.nn.Module):
    """A trunk added to the concat of two branches of different kernel sizes: channels of two costs."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Conv2d(3, 10, 1)
        self.left, self.right = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 6, 1)
        self.fc = torch.nn.Linear(10, 2)

    def forward(self, x):
        x = self.trunk(x) + torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fc(x.mean((2, 3)))


def test_a_concat_branch_is_counted_only_for_the_units_it_sees():
    torch.manual_seed(0)
    model, example = TrunkAndBranches().eval(), torch.randn(1, 3, 6, 6)
    trunk = structural.group_of(structural.channel_groups(model, example), "trunk")
    assert trunk.channels == 10 and not trunk.uniform()
    for units in ([0], [9], [0, 5, 9], [1, 2, 4, 6, 7]):
        pruned = structural.apply(model, {trunk.name: torch.tensor(units)}, example)
        assert _params(model) - _params(pruned) == trunk.params_removed(units), units
    # a left channel: trunk filter 3 + 1, left filter 3*3*3 + 1, fc column 2; a right one: 4 + 4 + 2
    assert trunk.params_removed([0]) == 34 and trunk.params_removed([9]) == 10
    assert trunk.params_per_channel_real == (4 * 34 + 6 * 10) / 10


def _transformer_groups(name):
    try:
        bundle = hf.builtin(name)
    except ExplorerError as error:  # minilm needs its package
        pytest.skip(str(error))
    model = bundle.model.eval()
    example = torch.randint(1, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    return model, example, structural.channel_groups(model, example)


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2"])
def test_every_transformer_channel_group_costs_what_a_real_removal_frees(name):
    model, example, groups = _transformer_groups(name)
    assert {g.kind for g in groups} >= {"linear", "residual-coupled"}
    for group in groups:
        assert group.uniform(), group.name
        _check_group(model, group, example)


@pytest.mark.parametrize("name", ["tiny_bert", "minilm"])
def test_every_head_and_ffn_neuron_group_costs_what_a_real_removal_frees(name):
    model, example, groups = _transformer_groups(name)
    attention = heads.attention_of(model, groups)
    assert attention
    for group in heads.units_of_head_structure(groups, attention):
        info = attention.get(group.name)
        if info is None:
            _check_group(model, group, example)
        else:
            _check_group(model, group, example, units_per_channel=info.head_dim, attention={group.name: info})


def test_a_tied_embedding_is_cut_once_and_stays_tied():
    model, example, groups = _transformer_groups("tiny_gpt2")
    residual = next(g for g in groups if g.kind == "residual-coupled")
    pruned = structural.apply(model, {residual.name: torch.tensor([0, 1])}, example)
    assert pruned.hf.lm_head.weight is pruned.hf.transformer.wte.weight
    vocabulary = model.hf.transformer.wte.num_embeddings
    tied = [m for m in residual.members if m.layer in ("hf.transformer.wte", "hf.lm_head")]
    assert sorted(m.params_per_channel for m in tied) == [0, vocabulary]
    assert pruned(example).shape[-1] == vocabulary
