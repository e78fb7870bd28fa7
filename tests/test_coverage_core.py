"""explorer/stats.py and explorer/tasks.py beyond their own test files: the edge cases (constant and
empty tensors, layers the loss never reaches, padding everywhere, outputs of the wrong shape), each
against a number computed here or the one line a user reads."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explorer import stats, tasks
from explorer.data import Dataset
from explorer.errors import ExplorerError

PAD = 0


class TinyLM(nn.Module):
    """A causal 'language model' over 7 token ids: logits (batch, length, vocab) from an embedding."""

    task = "causal_lm"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7)

    def forward(self, ids):
        return self.head(self.embed(ids))


def _text(x_test: torch.Tensor) -> Dataset:
    """A token-id dataset whose only split that matters is ``test``."""
    empty = torch.zeros((0, x_test.shape[1]), dtype=torch.long)
    labels = torch.full((len(x_test),), -1)
    return Dataset("ids", (x_test.shape[1],), 0, (), empty, torch.zeros(0, dtype=torch.long), empty,
                   torch.zeros(0, dtype=torch.long), x_test, labels, info={"pad_id": PAD, "labelled": False})


# ---------------------------------------------------------------------------------------------- stats
def test_a_constant_tensor_gets_a_unit_range_and_an_empty_one_is_refused():
    summary = stats.summarize(torch.full((6,), 2.5), bins=4)
    assert summary["hist"]["edges"] == [2.0, 2.25, 2.5, 2.75, 3.0]
    assert summary["hist"]["counts"] == [0, 0, 6, 0]  # 2.5 is the left edge of the third bin
    assert (summary["std"], summary["mean_abs"], summary["zeros_fraction"]) == (0.0, 2.5, 0.0)
    assert stats.summarize(torch.tensor([3.0]))["std"] == 0.0  # one value: no spread, not NaN
    with pytest.raises(ExplorerError, match="empty tensor"):
        stats.summarize(torch.zeros(0))
    with pytest.raises(ExplorerError, match="NaN or infinite"):
        stats.summarize(torch.tensor([1.0, math.inf]))


def test_a_layer_the_loss_never_reaches_has_zero_gradient_and_the_other_matches_autograd():
    class Detour(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = Detour()
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    summary = stats.gradient_stats(model, batches, bins=5)
    assert summary["unused"]["mean_abs"] == 0.0 and summary["unused"]["zeros_fraction"] == 1.0
    mean = sum(torch.autograd.grad(F.cross_entropy(model(x), y), model.used.weight)[0] for x, y in batches) / 2
    assert summary["used"]["mean_abs"] == pytest.approx(float(mean.abs().mean()), rel=1e-6)
    assert model.used.weight.grad is None  # worked on a copy


def test_stats_refuse_models_without_layers_data_or_the_named_layer():
    no_layers = nn.Sequential(nn.ReLU())
    with pytest.raises(ExplorerError, match="no Conv1d, Conv2d or Linear"):
        stats.weight_stats(no_layers)
    with pytest.raises(ExplorerError, match="no Conv1d, Conv2d or Linear"):
        stats.gradient_stats(no_layers, [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ExplorerError, match="at least one calibration batch"):
        stats.gradient_stats(nn.Linear(3, 2), [])
    with pytest.raises(ExplorerError, match="'fc9' has no output of its own to attribute; choose one of 0, 2"):
        stats.attribution(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "fc9", [])


# ---------------------------------------------------------------------------------------------- tasks
def test_perplexity_is_exp_of_the_mean_nll_of_the_tokens_that_are_not_padding():
    ids = torch.tensor([[1, 2, 3, PAD], [4, 5, PAD, PAD], [6, 1, 2, 3]])
    model = TinyLM()
    with torch.no_grad():
        logits = model(ids)
    nll, count = 0.0, 0
    for row in range(3):
        for t in range(3):
            target = int(ids[row, t + 1])
            if target != PAD:
                nll -= float(F.log_softmax(logits[row, t], 0)[target])
                count += 1
    assert count == 6
    assert tasks.perplexity(model, _text(ids)) == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert model.training  # put back as it was
    with pytest.raises(ExplorerError, match="has no tokens to predict"):
        tasks.perplexity(model, _text(torch.tensor([[1, PAD, PAD], [2, PAD, PAD]])))
    with pytest.raises(ExplorerError, match="no token to predict"):
        tasks.next_token_loss(logits[1:2, :2], ids[1:2, :2].clone().fill_(PAD), PAD)


def test_outputs_of_the_wrong_shape_or_kind_are_one_line():
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    flat = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 7))  # (batch, vocab): not a language model
    with pytest.raises(ExplorerError, match=r"Perplexity needs .* this model outputs \(2, 7\)"):
        tasks.perplexity(flat, _text(ids))
    with pytest.raises(ExplorerError, match=r"needs \(batch, length, vocab\) logits; got \(2, 7\)"):
        tasks.next_token_loss(flat(ids), ids, PAD)
    with pytest.raises(ExplorerError, match=r"outputs \(2, 3, 7\) where the dense one outputs \(2, 7\)"):
        tasks.fidelity(TinyLM(), flat, _text(ids))
    with pytest.raises(ExplorerError, match=r"outputs \(2, 7\) where the dense model outputs \(2, 3, 7\)"):
        tasks.distillation_loss(flat(ids), TinyLM()(ids), ids, PAD, embedding=False)
    with pytest.raises(ExplorerError, match="Distillation needs the dense model's outputs"):
        tasks.batch_loss("distill", flat(ids), ids, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ExplorerError, match="The next-token loss needs a causal language model"):
        tasks.loss_for(flat, _text(ids), "next_token")

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ExplorerError, match="returns tuple, not a tensor"):
        tasks.check_forward(Pair(), _text(ids))

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("no\nsecond line")

    with pytest.raises(ExplorerError, match=r"failed on a int64 tensor of shape \(2, 3\) \(token ids\): "
                                            r"ValueError: no\. It was given token ids") as error:
        tasks.perplexity(Broken(), _text(ids))
    assert "\n" not in str(error.value)


def test_evaluate_task_names_unknown_tasks_and_measures_and_fidelity_of_a_model_to_itself_is_perfect():
    ids = torch.tensor([[1, 2, 3], [3, 2, 1], [4, 4, 5]])
    data = _text(ids)
    with pytest.raises(ExplorerError, match="Unknown task 'speed'"):
        tasks.evaluate_task(TinyLM(), data, task="speed")
    with pytest.raises(ExplorerError, match="Unknown fidelity measure 'l2'"):
        tasks.evaluate_task(TinyLM(), data, task="fidelity", measure="l2")
    itself = tasks.evaluate_task(TinyLM(), data, task="fidelity")
    assert itself["measure"] == "top1" and itself["value"] == 1.0
    assert itself["measures"]["cosine"] == pytest.approx(1.0) and itself["measures"]["kl"] == pytest.approx(0.0,
                                                                                                              abs=1e-6)
    with pytest.raises(ExplorerError, match="is empty"):
        tasks.fidelity(TinyLM(), TinyLM(), _text(torch.zeros((0, 3), dtype=torch.long)))


def test_batch_loss_cross_entropy_and_next_token_are_the_textbook_formulas():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    expected = -sum(float(F.log_softmax(logits[i], 0)[labels[i]]) for i in range(5)) / 5
    assert float(tasks.batch_loss("cross_entropy", logits, None, labels)) == pytest.approx(expected, rel=1e-6)
    ids = torch.tensor([[1, 2, PAD]])
    lm = torch.randn(1, 3, 7)
    expected = -float(F.log_softmax(lm[0, 0], 0)[2])  # only position 0 -> token 2 counts; the pad is ignored
    assert float(tasks.batch_loss("next_token", lm, ids, None, pad_id=PAD)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- llm
class Keyword(nn.Module):
    """A two-layer net called with a keyword batch, as a Hugging Face model is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_wanda_over_a_generator_of_keyword_batches_is_weight_times_the_input_norm():
    from explorer import llm

    model = Keyword()
    batches = [{"x": torch.randn(5, 6)} for _ in range(3)]
    seen = []
    scores = llm.wanda_raw(model, (batch for batch in batches), progress=lambda f, text: seen.append(f))
    inputs = torch.cat([batch["x"] for batch in batches])
    hidden = torch.relu(model.fc1(inputs)).detach()
    for name, x in (("fc1", inputs), ("fc2", hidden)):
        expected = model.get_submodule(name).weight.detach().abs() * x.norm(dim=0)
        torch.testing.assert_close(scores[name], expected, rtol=1e-5, atol=1e-6)
    assert len(seen) == 3 and all(0 < f < 1 for f in seen)  # no length known: a fraction that never reaches 1


def test_llm_inputs_that_cannot_work_are_one_line():
    from explorer import llm

    model = Keyword()
    with pytest.raises(ExplorerError, match="'fc9' cannot be pruned here \\(no such module\\)"):
        llm.llm_layers(model, ["fc9"])
    with pytest.raises(ExplorerError, match="'' cannot be pruned here \\(Keyword\\)"):
        llm.llm_layers(model, [""])
    with pytest.raises(ExplorerError, match="wanda needs calibration data"):
        llm.wanda_raw(model, None)
    with pytest.raises(ExplorerError, match="calibration data is empty: sparsegpt"):
        llm.hessians(model, [])
    with pytest.raises(ExplorerError, match=r"failed on a calibration batch of \(2, 5\)"):
        llm.hessians(model, [torch.randn(2, 5)])
    hs = llm.hessians(model, [torch.randn(16, 6)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for kwargs, message in (({"percdamp": 0}, "percdamp must be a positive number"),
                            ({"blocksize": 0}, "blocksize must be a positive integer"),
                            ({"sparsity": {"fc1": 1.5}}, "Sparsity of layer 'fc1' must be a number between 0 and 1"),
                            ({"sparsity": {"fc1": 0.25}, "nm": (2, 4)}, "2:4 prunes exactly 50% of a layer"),
                            ({"sparsity": {"fc1": 0.5}, "nm": (2, 4)}, "has 6 inputs per output, not a multiple of 4")):
        with pytest.raises(ExplorerError, match=message):
            llm.sparsegpt_prune(model, hs, **{"sparsity": 0.5, **kwargs})
    wrong = {"fc1": torch.eye(5), "fc2": hs["fc2"]}
    with pytest.raises(ExplorerError, match=r"'fc1': its Hessian is \(5, 5\) but the layer has 6 inputs"):
        llm.sparsegpt_scores(model, wrong)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # refused before any change


# ---------------------------------------------------------------------------------------------- sensitivity
class Branchy(nn.Module):
    """An mlp whose forward branches on the data: torch.fx cannot trace it, so a scan re-runs it whole."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        hidden = self.fc1(x.flatten(1))
        if hidden.sum() > 0:  # data-dependent control flow
            hidden = torch.relu(hidden)
        return self.fc2(hidden)


def test_a_scan_of_a_model_fx_cannot_trace_equals_zeroing_each_layer_by_hand():
    from explorer import sensitivity
    from explorer.data import load_dataset
    from explorer.specs import ScoringSpec

    data = load_dataset("digits")
    model = Branchy().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    result = sensitivity.scan(model, data, ScoringSpec("unstructured", "magnitude"), sparsities=[0.5, 1.0],
                              samples=150)
    x, y = data.x_val[:150], data.y_val[:150]
    with torch.no_grad():
        assert result.base == float((model(x).argmax(1) == y).double().mean())
    for cell in result.cells:
        copy = Branchy()
        copy.load_state_dict(model.state_dict())
        weight = copy.get_submodule(cell.unit).weight
        with torch.no_grad():
            weight.view(-1)[torch.argsort(weight.abs().flatten(), stable=True)[:round(cell.sparsity * weight.numel())]] = 0
            value = float((copy.eval()(x).argmax(1) == y).double().mean())
        assert cell.value == pytest.approx(value, abs=1e-12), (cell.unit, cell.sparsity)
        assert cell.pruned == round(cell.sparsity * weight.numel())


def test_scan_inputs_that_cannot_work_are_one_line():
    import dataclasses

    from explorer import limits, pipeline, sensitivity
    from explorer.data import load_dataset
    from explorer.specs import ScoringSpec

    data = load_dataset("digits")
    model = Branchy()
    for samples, message in (("10", "whole number of examples or all, got '10'"),
                             (limits.MAX_SAMPLES + 1, "above the limit")):
        with pytest.raises(ExplorerError, match=message):
            sensitivity.check_samples(samples)
    no_val = dataclasses.replace(data, x_val=data.x_val[:0], y_val=data.y_val[:0])
    with pytest.raises(ExplorerError, match="The val split of 'digits' is empty"):
        sensitivity.scan(model, no_val, ScoringSpec())
    random_scores = pipeline.prepare(model, ScoringSpec("unstructured", "random"), dataset=data)
    with pytest.raises(ExplorerError, match="prepared scores are unstructured / random, the scan asks for "
                                            "unstructured / magnitude"):
        sensitivity.scan(model, data, ScoringSpec(), samples=50, prepared=random_scores)
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # fewer outputs than digits has classes
    with pytest.raises(ExplorerError, match=r"outputs \(\d+, 3\); a classifier for 10 classes"):
        sensitivity.scan(three, data, ScoringSpec(), samples=50, sparsities=[0.5])
