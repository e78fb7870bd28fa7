"""Task metrics: accuracy, perplexity and fidelity against direct computations; forward failures as one line."""
import math

import pytest
import torch
from torch import nn

from explorer import tasks
from explorer.data import Dataset, load_dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model
from explorer.models import build

PAD = 0


class TinyLM(nn.Module):
    """Embedding + Linear to the vocabulary: (N, L) token ids -> (N, L, V) logits."""

    task = "causal_lm"

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class TinyEncoder(TinyLM):
    """Mean of token features over the non-padding positions: (N, L) -> (N, width)."""

    task = "embedding"

    def forward(self, ids):
        keep = (ids != PAD).unsqueeze(-1).float()
        features = torch.tanh(self.embed(ids))
        return (features * keep).sum(1) / keep.sum(1).clamp_min(1)


def token_dataset(n: int = 24, length: int = 7, vocab: int = 11, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    ids[torch.arange(length) >= lengths.unsqueeze(1)] = PAD  # right padding
    y = torch.full((n,), -1)
    third = n // 3
    return Dataset(name="tokens", input_shape=(length,), num_classes=0, class_names=(), x_train=ids[:third],
                   y_train=y[:third], x_val=ids[third:2 * third], y_val=y[third:2 * third], x_test=ids[2 * third:],
                   y_test=y[2 * third:], info={"kind": "text", "pad_id": PAD, "labelled": False})


def test_perplexity_equals_a_token_by_token_computation():
    torch.manual_seed(0)
    model, data = TinyLM().eval(), token_dataset()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in data.x_test:
            probs = torch.softmax(model(ids[None])[0], -1)
            for t in range(len(ids) - 1):
                if ids[t + 1] != PAD:
                    nll -= math.log(float(probs[t, ids[t + 1]]))
                    count += 1
    assert tasks.perplexity(model, data) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert tasks.task_for(model, data) == "perplexity"


def test_fidelity_is_perfect_for_the_unpruned_copy_and_drops_after_pruning():
    torch.manual_seed(0)
    model, data = TinyLM().eval(), token_dataset()
    same = tasks.fidelity(clone_model(model), model, data)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1"] == 1.0
    pruned = clone_model(model)
    with torch.no_grad():
        pruned.head.weight[pruned.head.weight.abs() < pruned.head.weight.abs().median()] = 0
    drop = tasks.fidelity(pruned, model, data)
    assert drop["cosine"] < 0.999 and drop["kl"] > 1e-4 and drop["top1"] < 1.0


def test_kl_and_agreement_equal_a_direct_computation_over_non_padding_tokens():
    torch.manual_seed(1)
    model, other, data = TinyLM().eval(), TinyLM().eval(), token_dataset()
    kl, agree, rows = 0.0, 0, 0
    with torch.no_grad():
        for ids in data.x_test:
            p, q = torch.softmax(model(ids[None])[0], -1), torch.softmax(other(ids[None])[0], -1)
            for t in range(len(ids)):
                if ids[t] != PAD:
                    kl += float((p[t] * (p[t].log() - q[t].log())).sum())
                    agree += int(p[t].argmax() == q[t].argmax())
                    rows += 1
    measured = tasks.fidelity(other, model, data)
    assert measured["kl"] == pytest.approx(kl / rows, rel=1e-4)
    assert measured["top1"] == pytest.approx(agree / rows)


def test_kept_reference_outputs_give_the_same_fidelity_and_too_large_ones_are_not_kept():
    torch.manual_seed(1)
    model, other, data = TinyLM().eval(), TinyLM().eval(), token_dataset()
    kept = tasks.reference_outputs(model, data, "val", batch_size=5)
    assert len(kept) == math.ceil(len(data.x_val) / 5)
    assert tasks.fidelity(other, model, data, "val", batch_size=5, outputs=kept) == tasks.fidelity(
        other, model, data, "val", batch_size=5)
    assert tasks.reference_outputs(model, data, "val", max_bytes=100) is None


def test_an_embedding_model_is_judged_by_cosine_fidelity_and_refuses_kl():
    torch.manual_seed(0)
    model, data = TinyEncoder().eval(), token_dataset()
    assert tasks.task_for(model, data) == "fidelity"
    result = tasks.evaluate_task(clone_model(model), data, reference=model)
    assert (result["name"], result["measure"]) == ("fidelity", "cosine")
    assert result["value"] == pytest.approx(1.0, abs=1e-6) and result["measures"]["kl"] is None
    with pytest.raises(ExplorerError, match="use cosine"):
        tasks.evaluate_task(model, data, reference=model, measure="kl")


def test_a_labelled_classifier_keeps_accuracy():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)
    result = tasks.evaluate_task(model, data)
    assert result["name"] == "accuracy"
    with torch.no_grad():
        expected = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    assert result["value"] == pytest.approx(expected)


def test_a_model_that_wants_token_ids_fed_images_is_one_line_saying_what_to_do():
    data = load_dataset("digits")
    with pytest.raises(ExplorerError) as error:
        tasks.check_forward(TinyLM(), data, "tiny_lm")
    message = str(error.value)
    assert "\n" not in message and "tiny_lm" in message and "(2, 1, 8, 8)" in message and "--data text" in message


def test_an_image_model_fed_token_ids_is_one_line_too():
    model = build("mlp", (1, 8, 8), 10)
    with pytest.raises(ExplorerError) as error:
        tasks.check_forward(model, token_dataset(), "mlp")
    message = str(error.value)
    assert "\n" not in message and "token ids" in message and "--data" in message
