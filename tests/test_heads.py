"""Head pruning: whole attention heads and FFN neurons physically removed from a BERT-style encoder."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from explorer import heads, pipeline  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.specs import PlanSpec, ScoringSpec  # noqa: E402

HEADS, HEAD_DIM = 4, 16


class Encoder(torch.nn.Module):
    """A small BertModel behind one tensor input: mean-pooled last hidden state of non-padding tokens."""

    task = "embedding"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=300, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2,
                                         num_attention_heads=HEADS, intermediate_size=96, max_position_embeddings=32)
        self.hf = transformers.BertModel(config).eval()

    def forward(self, ids):
        mask = ids != 0
        hidden = self.hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        keep = mask.unsqueeze(-1).float()
        return (hidden * keep).sum(1) / keep.sum(1)


def ids(n=5, length=12):
    return torch.randint(1, 300, (n, length), generator=torch.Generator().manual_seed(1))


def prune_half(model):
    prepared = pipeline.prepare(model, ScoringSpec(structure="head", criterion="magnitude"), example_input=ids(1))
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local"))
    return prepared, plan, pipeline.apply(model, prepared, plan)


def test_heads_are_units_of_attention_groups_and_neurons_of_ffn_groups():
    model = Encoder()
    prepared, plan, pruned = prune_half(model)
    attention = {name: info for name, info in prepared.attention.items()}
    assert len(attention) == 2 and all(info.heads == HEADS for info in attention.values())
    for layer in plan.layers:
        assert layer.total == (HEADS if layer.name in attention else 96)
        assert layer.pruned == layer.total // 2
    assert heads.head_counts(pruned) == {f"hf.encoder.layer.{i}.attention.self": HEADS // 2 for i in range(2)}
    assert heads.head_counts(model) == {f"hf.encoder.layer.{i}.attention.self": HEADS for i in range(2)}  # untouched
    assert pruned.hf.encoder.layer[0].intermediate.dense.out_features == 48


def test_the_pruned_model_equals_the_dense_one_with_those_heads_and_neurons_zeroed():
    model = Encoder()
    prepared, plan, pruned = prune_half(model)
    from explorer import planner

    zeroed = Encoder()  # same seed, same weights
    layers = dict(zeroed.named_modules())
    with torch.no_grad():
        for layer in plan.layers:
            gone = planner.pruned_indices(prepared.ranking, plan, layer.name)
            info = prepared.attention.get(layer.name)
            if info is not None:  # a head without values and output columns adds nothing
                channels = (gone.reshape(-1, 1) * info.head_dim + torch.arange(info.head_dim)).reshape(-1)
                attention = layers[info.module]
                attention.value.weight[channels] = 0
                attention.value.bias[channels] = 0
                layers[info.module.rpartition(".")[0] + ".output.dense"].weight[:, channels] = 0
            else:  # an FFN neuron: its output column in the next projection
                layers[layer.name.rpartition(".")[0].rpartition(".")[0] + ".output.dense"].weight[:, gone] = 0
    x = ids()
    torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-4)


def test_scores_per_head_are_the_mean_of_their_channels():
    scores = {"q": torch.arange(8.0), "ffn": torch.tensor([3.0, 1.0])}
    info = {"q": heads.HeadInfo("attn", heads=2, head_dim=4)}
    result = heads.head_scores(scores, info)
    assert result["q"].tolist() == [1.5, 5.5] and result["ffn"].tolist() == [3.0, 1.0]
    assert heads.expand({"q": torch.tensor([1]), "ffn": torch.tensor([0])}, info)["q"].tolist() == [4, 5, 6, 7]


def test_gpt2_fused_attention_is_refused_in_one_line():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2Model(config)
    with pytest.raises(ExplorerError, match="fused projection.*unstructured or nm"):
        heads.check_supported(model)


def test_a_head_pruned_builtin_transformer_saves_and_reloads_with_its_head_counts(tmp_path):
    from explorer.models import load_model, save_model
    from explorer.specs import ModelSpec

    model, dataset, arch = pipeline.resolve_model(ModelSpec(source="tiny_bert", data="text", baseline=False))
    prepared = pipeline.prepare(model, ScoringSpec(structure="head", criterion="magnitude"), dataset=dataset)
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="local"))
    pruned = pipeline.apply(model, prepared, plan)
    path = save_model(pruned, tmp_path / "tiny_bert_heads.pt", arch=arch, input_shape=dataset.input_shape,
                      num_classes=dataset.num_classes)
    reloaded = load_model(str(path)).eval()
    assert heads.head_counts(reloaded) == heads.head_counts(pruned) != heads.head_counts(model)
    x = dataset.example_input(4)
    torch.testing.assert_close(reloaded(x), pruned(x))
