"""Gradient criteria and fine-tuning on every task (explorer.tasks losses, explorer.train), transformers included.

Losses are checked against direct computations; a labelled classifier scores exactly as before.
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from explorer import criteria, hf, pipeline, stats, tasks, text
from explorer.errors import ExplorerError
from explorer.recipe import PlanSpec, ScoringSpec
from explorer.train import Callback, TrainConfig, train
from test_criteria import calib_batches, small_model

# Per-layer sums of the scores of test_criteria's small model, recorded before the task losses
# existed (cross-entropy on labels); a labelled classifier must still score exactly so.
BEFORE = {
    "gradient": ({"0": 0.7680633165, "3": 4.419078721, "7": 0.7010655161},
                 {"0": 0.7680633496, "3": 4.4190788269, "7": 0.701065518}),
    "taylor": ({"0": 0.0811544029, "3": 0.290518025, "7": 0.2010409378},
               {"0": 0.0336290114, "3": 0.0552787194, "7": 0.0921936953}),
    "snip": ({"0": 0.0606765084, "3": 0.2528418134, "7": 0.1476861644},
             {"0": 0.0606765066, "3": 0.2528418154, "7": 0.147686163}),
}
GRADIENT_CRITERIA = ("gradient", "taylor", "snip")


@pytest.fixture(scope="module")
def bert():
    return hf.builtin("tiny_bert")


@pytest.fixture(scope="module")
def gpt2():
    return hf.builtin("tiny_gpt2")


@pytest.fixture(scope="module")
def bert_text(bert):
    return text.text_dataset(bert.tokenizer, seq_len=24)


@pytest.fixture(scope="module")
def gpt2_text(gpt2):
    return text.text_dataset(gpt2.tokenizer, seq_len=24)


def embedding_model(bert):
    """tiny_bert's encoder with mean pooling: an embedding model as fast as tiny_bert."""
    return hf.TokenModel(bert.model.hf.bert, "embedding", bert.model.pad_id)


@pytest.mark.parametrize("criterion", GRADIENT_CRITERIA)
def test_labelled_classifier_scores_exactly_as_before(criterion):
    model, calib = small_model(), calib_batches()
    weights_before, channels_before = BEFORE[criterion]
    for scores, before in ((criteria.weight_scores(model, criterion, calib), weights_before),
                           (criteria.channel_scores(model, criterion, calib), channels_before)):
        assert {name: float(score.double().sum()) for name, score in scores.items()} == \
            pytest.approx(before, rel=1e-6)


def _check_informative(scores):
    flat = torch.cat([score.flatten() for score in scores.values()])
    assert torch.isfinite(flat).all()
    assert float(flat.abs().max()) > 0
    assert flat.unique().numel() > flat.numel() // 2  # weights are told apart, not tied
    for name, score in scores.items():
        if "pooler" not in name:  # the embedding model pools itself; BERT's pooler never runs
            assert float(score.std()) > 0, name


@pytest.mark.parametrize("criterion", GRADIENT_CRITERIA)
@pytest.mark.parametrize("which", ["unlabelled classifier", "causal_lm", "embedding"])
def test_gradient_criteria_work_on_every_task(which, criterion, bert, gpt2, bert_text, gpt2_text):
    model, dataset = {"unlabelled classifier": (bert.model, bert_text), "causal_lm": (gpt2.model, gpt2_text),
                      "embedding": (embedding_model(bert), bert_text)}[which]
    assert not tasks.is_labelled(dataset)
    calib = dataset.calibration(2, 8)
    _check_informative(criteria.weight_scores(model, criterion, calib))
    channel = criteria.channel_scores(model, criterion, calib)
    assert all(torch.isfinite(score).all() and float(score.max()) > 0
               for name, score in channel.items() if "pooler" not in name)
    again = criteria.weight_scores(model, criterion, calib)  # sampled targets are seeded: repeatable
    assert all(torch.equal(again[name], score) for name, score in criteria.weight_scores(model, criterion, calib).items())


def test_gradient_stats_work_on_unlabelled_text(bert, bert_text):
    summary = stats.gradient_stats(bert.model, bert_text.calibration(1, 8))
    assert all(row["mean_abs"] > 0 for name, row in summary.items() if "pooler" not in name)


def test_next_token_loss_is_the_log_of_perplexity(gpt2, gpt2_text):
    model = gpt2.model.eval()
    x = gpt2_text.split("test")[0]
    with torch.no_grad():
        loss = tasks.next_token_loss(model(x), x, gpt2_text.info["pad_id"])
    assert float(loss) == pytest.approx(math.log(tasks.perplexity(model, gpt2_text, "test", batch_size=len(x))),
                                        rel=1e-5)


def test_next_token_loss_by_hand():
    torch.manual_seed(0)
    pad = 0
    ids = torch.tensor([[5, 3, 2, 0, 0], [1, 4, 4, 2, 6]])
    logits = torch.randn(2, 5, 7)
    terms = [-F.log_softmax(logits[n, t], 0)[ids[n, t + 1]] for n in range(2) for t in range(4) if ids[n, t + 1] != pad]
    assert float(tasks.next_token_loss(logits, ids, pad)) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)


def test_distillation_loss_by_hand():
    torch.manual_seed(0)
    student, teacher, ids, temperature = torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 3, dtype=torch.long), 2.0
    p = F.softmax(teacher / temperature, 1)
    kl = (p * (p.log() - F.log_softmax(student / temperature, 1))).sum(1).mean() * temperature ** 2
    got = tasks.distillation_loss(student, teacher, ids, 0, embedding=False, temperature=temperature)
    assert float(got) == pytest.approx(float(kl), rel=1e-6)
    cosine = tasks.distillation_loss(student, teacher, ids, 0, embedding=True)
    by_hand = 1 - sum(float(student[i] @ teacher[i] / (student[i].norm() * teacher[i].norm())) for i in range(4)) / 4
    assert float(cosine) == pytest.approx(by_hand, rel=1e-6)
    assert float(tasks.distillation_loss(teacher, teacher, ids, 0, embedding=False)) == pytest.approx(0, abs=1e-6)


def test_sampled_fisher_loss_draws_from_the_model_and_has_a_gradient_where_distillation_has_none():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, requires_grad=True)
    inputs = torch.randn(8, 3)
    output = inputs @ weight.T
    ids = torch.ones(8, 2, dtype=torch.long)
    loss = tasks.sampled_fisher_loss(output, ids, None, embedding=False, generator=torch.Generator().manual_seed(3))
    targets = torch.multinomial(F.softmax(output.detach(), 1), 1, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(F.cross_entropy(output, targets.squeeze(1)).item(), rel=1e-6)
    (fisher_grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    distill = tasks.distillation_loss(output, output.detach(), ids, None, embedding=False)
    (distill_grad,) = torch.autograd.grad(distill, weight)
    assert float(distill_grad.abs().max()) < 1e-6 < float(fisher_grad.abs().max())
    gaussian = tasks.sampled_fisher_loss(output, ids, None, embedding=True, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(3))
    assert gaussian.item() == pytest.approx(float(0.5 * noise.pow(2).sum(1).mean()), rel=1e-6)


def test_calibration_loss_picks_the_task_loss(bert, gpt2, bert_text, gpt2_text):
    generator = torch.Generator().manual_seed(0)
    x, y = gpt2_text.calibration(1, 4)[0]
    with torch.no_grad():
        expected = tasks.next_token_loss(gpt2.model(x), x, gpt2.model.pad_id)
        assert float(tasks.calibration_loss(gpt2.model, x, y, generator)) == pytest.approx(float(expected))
        x, _ = bert_text.calibration(1, 4)[0]
        labels = torch.tensor([0, 1, 1, 0])
        expected = F.cross_entropy(bert.model(x), labels)
        assert float(tasks.calibration_loss(bert.model, x, labels, generator)) == pytest.approx(float(expected))


def test_loss_for_follows_the_task(bert, gpt2, bert_text, gpt2_text):
    assert tasks.loss_for(bert.model, bert_text) == "distill"
    assert tasks.loss_for(gpt2.model, gpt2_text) == "next_token"
    assert tasks.loss_for(gpt2.model, gpt2_text, "distill") == "distill"
    with pytest.raises(ExplorerError, match="labelled"):
        tasks.loss_for(bert.model, bert_text, "cross_entropy")
    with pytest.raises(ExplorerError, match="Unknown loss"):
        tasks.loss_for(bert.model, bert_text, "mse")


# ---------------------------------------------------------------------------- fine-tuning


def small(dataset, train=96, held_out=32):
    return dataclasses.replace(dataset, x_train=dataset.x_train[:train], y_train=dataset.y_train[:train],
                               x_val=dataset.x_val[:held_out], y_val=dataset.y_val[:held_out],
                               x_test=dataset.x_test[:held_out], y_test=dataset.y_test[:held_out])


def half_pruned(model, dataset):
    prepared = pipeline.prepare(model, ScoringSpec(structure="unstructured", criterion="magnitude"), dataset=dataset)
    return pipeline.apply(model, prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5, scope="global")))


def test_a_causal_lm_fine_tunes_on_its_text_and_reports_perplexity(gpt2, gpt2_text):
    data = small(gpt2_text)
    before = tasks.perplexity(gpt2.model, data, "val")
    result = train(gpt2.model, data, TrainConfig(epochs=2, lr=3e-3, batch_size=32, schedule="constant"))
    assert [(row["loss_kind"], row["metric"], row["val_accuracy"]) for row in result.history] == \
        [("next_token", "perplexity", None)] * 2
    assert result.history[-1]["val_metric"] == pytest.approx(tasks.perplexity(result.model, data, "val"))
    assert result.history[-1]["val_metric"] < before


@pytest.mark.parametrize("kind", ["classifier", "embedding"])
def test_distillation_brings_a_pruned_model_back_towards_the_dense_one(kind, bert, bert_text):
    dense = bert.model if kind == "classifier" else embedding_model(bert)
    data = small(bert_text)
    pruned = half_pruned(dense, data)
    kept = {name: value.clone() for name, value in dense.state_dict().items()}
    before = tasks.fidelity(pruned, dense, data, "val")
    result = train(pruned, data, TrainConfig(epochs=2, lr=1e-4, batch_size=32), teacher=dense)
    after = tasks.fidelity(result.model, dense, data, "val")
    measure = "top1" if kind == "classifier" else "cosine"
    assert [(row["loss_kind"], row["metric"]) for row in result.history] == [("distill", measure)] * 2
    assert result.history[-1]["val_metric"] == pytest.approx(after[measure])
    assert after["cosine"] > before["cosine"]
    if kind == "classifier":
        assert after["kl"] < before["kl"]
    assert all(torch.equal(kept[name], value) for name, value in dense.state_dict().items())  # teacher untouched
    masked = dict(result.model.named_buffers())
    assert all(not bool(module.weight[masked[f"{name}.weight_mask"] == 0].any())  # masks hold while training
               for name, module in result.model.named_modules() if f"{name}.weight_mask" in masked)


def test_every_step_minimises_the_distillation_loss_of_its_batch(bert, bert_text):
    """The loss a step reports is 1 - cosine to the dense embeddings, computed here by hand.

    Equal only because a distilled student runs without dropout (see train._training_mode).
    """
    data = small(bert_text, train=16)
    dense = embedding_model(bert)
    expected, reported = [], []

    class Watch(Callback):
        def on_step_start(self, state):
            with torch.no_grad():
                student, teacher = state.model(state.x), dense.eval()(state.x)
            cosine = (student * teacher).sum(1) / (student.norm(dim=1) * teacher.norm(dim=1))
            expected.append(float((1 - cosine).mean()))

        def on_step_end(self, state):
            reported.append(state.loss)

    result = train(half_pruned(dense, data), data, TrainConfig(epochs=1, lr=1e-3, batch_size=8), teacher=dense,
                   callbacks=[Watch()])
    assert result.history[0]["loss_kind"] == "distill" and len(reported) == 2
    assert reported == pytest.approx(expected, rel=1e-5) and min(expected) > 0


def test_loss_setting_is_validated_and_old_configs_keep_their_dict():
    assert "loss" not in TrainConfig().to_dict() and "temperature" not in TrainConfig().to_dict()
    assert TrainConfig(loss="distill", temperature=2.0).to_dict()["loss"] == "distill"
    with pytest.raises(ExplorerError, match="loss"):
        TrainConfig(loss="mse").validate()
    with pytest.raises(ExplorerError, match="temperature"):
        TrainConfig(temperature=0).validate()


def test_forced_distillation_trains_a_labelled_classifier_and_reports_accuracy():
    from test_train import tiny_dataset

    data = tiny_dataset()
    dense = torch.nn.Linear(3, 2)
    result = train(dense, data, TrainConfig(epochs=1, batch_size=16, loss="distill", temperature=2.0))
    row = result.history[0]
    assert row["loss_kind"] == "distill" and row["metric"] == "accuracy" and row["val_accuracy"] == row["val_metric"]


def test_a_recipe_prunes_and_distils_a_transformer_without_labels(tmp_path, capsys):
    """``python -m explorer run --recipe`` with a transformer and a fine-tune: history names the metric."""
    lines = [f"sentence number {i} says that the model {'prunes' if i % 2 else 'keeps'} weight {i % 7}."
             for i in range(100)]
    (tmp_path / "notes.txt").write_text("\n".join(lines))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{source: tiny_bert, data: text, data_file: {tmp_path / 'notes.txt'}}}\n"
                      "scoring: {structure: unstructured, criterion: taylor, calib_batches: 1}\n"
                      "plan: {sparsity: 0.5}\n"
                      "finetune: {epochs: 1, lr: 0.0001, batch_size: 16}\n"
                      "measure: {batch: 8, latency: false}\n")
    from explorer import cli

    assert cli.main(["run", "--recipe", str(recipe), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["task"]["name"] == "fidelity"
    assert [(row["metric"], row["val_accuracy"]) for row in result["history"]] == [("top1", None)]
    assert 0 <= result["history"][0]["val_metric"] <= 1
    assert result["recipe"]["finetune"]["loss"] == "auto"


def test_conductance_on_token_ids_is_one_clear_error(bert, bert_text):
    with pytest.raises(ExplorerError, match="token ids cannot be scaled"):
        criteria.channel_scores(bert.model, "conductance", bert_text.calibration(1, 4))
