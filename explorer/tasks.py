"""What "good" means for a model: accuracy, perplexity, or fidelity to the dense model.

* **accuracy**: a classifier on labelled data (fraction correct on a split), as always.
* **perplexity**: a causal language model on held-out text: exp of the mean negative
  log-likelihood of every next token that is not padding.
* **fidelity**: any model, labels or not: how close the pruned model's outputs stay to the dense
  model's on the same inputs. ``cosine`` (mean cosine similarity of output vectors: embeddings,
  logits), ``kl`` (mean KL(dense || pruned) of the output distributions; logits only) and
  ``top1`` (fraction of inputs / tokens whose arg-max agrees; logits only). The unpruned copy
  scores cosine 1, KL 0, top-1 1.

`task_for` picks the task from the model and the data; `evaluate_task` returns one dict that
pages, the CLI JSON and Compare show under the task's own name.

Each task has a loss that training and gradient criteria differentiate (`loss_for`, `batch_loss`):
``cross_entropy`` on labels, ``next_token`` (the log of perplexity) for a causal LM, and
``distill`` (agreement with the frozen dense model) when there are no labels. Gradient criteria
calibrate at the dense point, where a distillation loss is flat; they use `calibration_loss`. `check_forward` turns a model
that cannot run on the given inputs into one line that says what it was given and what to do.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.layers import clone_model, model_device

TASKS = ("accuracy", "perplexity", "fidelity")
LOSSES = ("auto", "cross_entropy", "next_token", "distill")  # what training minimises; auto picks by task
FIDELITY_MEASURES = ("cosine", "kl", "top1")
PERFECT = {"cosine": 1.0, "kl": 0.0, "top1": 1.0}  # fidelity of the dense model to itself
HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False, "cosine": True, "kl": False, "top1": True}


def model_task(model: nn.Module) -> str | None:
    """What a model says it is (``classification``, ``causal_lm``, ``embedding``), or None for plain modules."""
    return getattr(model, "task", None)


def is_labelled(dataset: Dataset) -> bool:
    return bool(dataset.info.get("labelled", True)) and dataset.num_classes > 0


def task_for(model: nn.Module, dataset: Dataset) -> str:
    """The task metric a model is judged by on ``dataset``: accuracy, perplexity or fidelity."""
    kind = model_task(model)
    if kind == "causal_lm":
        return "perplexity"
    if kind in (None, "classification") and is_labelled(dataset):
        return "accuracy"
    return "fidelity"


def default_measure(model: nn.Module) -> str:
    """Fidelity's headline measure: cosine for embeddings, top-1 agreement for anything with logits."""
    return "cosine" if model_task(model) == "embedding" else "top1"


def _describe_input(x: torch.Tensor) -> str:
    kind = "token ids" if not x.is_floating_point() else "values"
    return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)} ({kind})"


def _advice(x: torch.Tensor, model: nn.Module) -> str:
    if model_task(model) is not None and x.is_floating_point():
        return "This transformer takes token ids: use --data text (or --data text --data-file FILE)."
    if x.is_floating_point():
        return ("If the model takes token ids, use --data text (or --data text --data-file FILE); otherwise "
                "give inputs of the shape it expects with --data (digits, mnist1d, shapes or tensors --data-file FILE).")
    return ("It was given token ids: pick a dataset of the shape it expects with --data "
            "(digits, mnist1d, shapes or tensors --data-file FILE).")


def forward_error(model: nn.Module, x: torch.Tensor, exc: BaseException, label: str = "the model") -> ExplorerError:
    """One line for a forward that failed: the model, the input it was given, how to give the right one."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ExplorerError(f"{label} failed on {_describe_input(x)}: {type(exc).__name__}: {first}. {_advice(x, model)}")


def check_forward(model: nn.Module, dataset: Dataset, label: str = "the model") -> torch.Tensor:
    """Run ``model`` once on two real inputs of ``dataset``; any failure becomes one ExplorerError line."""
    x = dataset.example_input(2).to(model_device(model))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - a user's model may raise anything; say it in one line
        raise forward_error(model, x, exc, label) from exc
    if not isinstance(out, torch.Tensor):
        raise ExplorerError(f"{label} returns {type(out).__name__}, not a tensor; wrap it so forward returns the "
                            "logits (or embeddings) tensor.")
    if task_for(model, dataset) == "accuracy" and out.ndim == 2 and out.shape[1] < dataset.num_classes:
        raise ExplorerError(f"{label} outputs {out.shape[1]} classes, but the labels of '{dataset.name}' go up to "
                            f"{dataset.num_classes - 1}; give labels 0..{out.shape[1] - 1} or a model with "
                            f"{dataset.num_classes} outputs.")
    return out


def _outputs(model: nn.Module, dataset: Dataset, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    device = model_device(model)
    for x, y in dataset.batches(split, batch_size):
        x = x.to(device)
        try:
            out = model(x)
        except Exception as exc:  # noqa: BLE001
            raise forward_error(model, x, exc) from exc
        yield x, y.to(device), out


def _in_eval_mode(model: nn.Module) -> tuple[nn.Module, bool]:
    """Put the model (not a copy) in eval mode; returns it and whether it was training, for the caller to restore."""
    was_training = model.training
    model.eval()
    return model, was_training


LOGIT_BUDGET = 1 << 25  # logits in one perplexity batch (128 MB): 667 tokens at GPT-2's 50,257 words


def _trimmed_batches(dataset: Dataset, split: str, batch_size: int, pad_id,
                     max_tokens: int | None = None, token_budget: int | None = None) -> Iterator[torch.Tensor]:
    """A split's sequences sorted by length, in batches of about ``batch_size`` full-length sequences' tokens
    (at most ``max_tokens``, at least one sequence), each cut after its last real token.

    Right padding changes no real token's logits in a causal model, so dropping padded columns changes no
    term of the perplexity; it skips most of the work (and the batch x length x vocab logits) on short lines.
    ``token_budget`` keeps the split's first sequences (its own seeded order) whose tokens up to the last
    real one add up to at most that many (always the first one).
    """
    x, _ = dataset.split(split)
    if x.ndim == 2 and len(x) and token_budget is not None:
        x = x[:_budget_rows(_used_lengths(x, pad_id), token_budget)]
    if pad_id is None or x.ndim != 2 or len(x) == 0:
        yield from (x[start:start + batch_size] for start in range(0, len(x), batch_size))
        return
    lengths = _used_lengths(x, pad_id)  # one past the last real token
    order = torch.argsort(lengths, stable=True)
    budget, start = min(batch_size * x.shape[1], max_tokens or batch_size * x.shape[1]), 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * int(lengths[order[stop]]) <= budget:
            stop += 1
        rows = order[start:stop]
        yield x[rows, :int(lengths[rows].max())]
        start = stop


def _used_lengths(x: torch.Tensor, pad_id) -> torch.Tensor:
    """Each sequence's tokens up to its last real one (at least 1): what a token budget counts."""
    if pad_id is None:
        return torch.full((len(x),), x.shape[1])
    return ((x != pad_id) * torch.arange(1, x.shape[1] + 1)).max(dim=1).values.clamp(min=1)


def _budget_rows(used: torch.Tensor, token_budget: int) -> int:
    """How many first sequences a budget keeps: those whose used tokens add up to at most it (always one)."""
    return max(1, int((used.cumsum(0) <= token_budget).sum()))


def eval_tokens(dataset: Dataset, split: str = "test", token_budget: int | None = None) -> tuple[int, int]:
    """``(scored, total)``: the tokens `perplexity` reads under ``token_budget`` (None: all) and the split's
    tokens, each sequence counted up to its last real token; for an output line such as "on the first
    1,020 of 8,607 test tokens"."""
    x, _ = dataset.split(split)
    if x.ndim != 2 or not len(x):
        return 0, 0
    used = _used_lengths(x, dataset.info.get("pad_id"))
    total = int(used.sum())
    return (total if token_budget is None else int(used[:_budget_rows(used, token_budget)].sum())), total


def tokens_phrase(tokens: dict, hint: str = "") -> str:
    """'on the first 1,020 of 8,607 test tokens; --eval-tokens 0 for all' or 'on all 8,607 test tokens', from
    ``{scored, total}`` (`eval_tokens`); ``hint`` (such as '--eval-tokens 0 for all') follows a partial count."""
    scored, total = tokens["scored"], tokens["total"]
    if scored >= total:
        return f"on all {total:,} test tokens"
    return f"on the first {scored:,} of {total:,} test tokens" + (f"; {hint}" if hint else "")


def perplexity(model: nn.Module, dataset: Dataset, split: str = "test", *, batch_size: int = 32,
               max_tokens: int | None = None, progress: Callable[[float, str], None] | None = None) -> float:
    """exp(mean NLL) of every next token that is not padding; the model returns (N, L, vocab) logits.

    Sequences run sorted by length with their trailing padding cut (`_trimmed_batches`): the same terms
    as padded batches of ``batch_size``, without computing logits for padding, and a transformer's batch
    holds at most `LOGIT_BUDGET` logits (a large vocabulary gets fewer tokens a batch). ``max_tokens``
    bounds the cost on a large model: only the split's first sequences holding at most that many
    tokens are scored (the same ones for every model, so base and pruned stay comparable).
    ``progress(fraction, text)`` follows the batches (minutes on a 1 B model).
    """
    pad_id = dataset.info.get("pad_id")
    total, count = 0.0, 0
    model, was_training = _in_eval_mode(model)
    device = model_device(model)
    vocab = getattr(getattr(getattr(model, "hf", None), "config", None), "vocab_size", None)
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 1
    try:
        with torch.no_grad():
            batches = list(_trimmed_batches(dataset, split, batch_size, pad_id,
                                            max_tokens=max(1, LOGIT_BUDGET // vocab), token_budget=max_tokens))
            for index, x in enumerate(batches):
                if progress is not None:
                    progress(index / len(batches), f"perplexity: batch {index + 1} of {len(batches)}")
                x = x.to(device)
                try:
                    logits = model(x)
                except Exception as exc:  # noqa: BLE001
                    raise forward_error(model, x, exc) from exc
                if logits.ndim != 3:
                    raise ExplorerError(f"Perplexity needs a causal language model's (batch, length, vocab) logits; "
                                        f"this model outputs {tuple(logits.shape)}.")
                batch_total, batch_count = next_token_nll_sum(logits, x, pad_id)
                total += batch_total
                count += batch_count
    finally:
        model.train(was_training)
    if count == 0:
        raise ExplorerError(f"The {split} split of '{dataset.name}' has no tokens to predict.")
    return math.exp(total / count)


def _token_rows(x: torch.Tensor, out: torch.Tensor, pad_id) -> torch.Tensor:
    """Output vectors to compare: one per input, or one per non-padding token of a sequence output."""
    if out.ndim == 3 and out.shape[1] == x.shape[1]:
        keep = x != pad_id if pad_id is not None else torch.ones(x.shape, dtype=torch.bool, device=x.device)
        return out[keep]
    return out.reshape(out.shape[0], -1)


def reference_outputs(reference: nn.Module, dataset: Dataset, split: str = "test", *, batch_size: int = 32,
                      max_bytes: int = 256 << 20) -> list[torch.Tensor] | None:
    """The dense model's outputs on ``split``, batch by batch as `fidelity` reads them, to compare many
    candidates against one reference without running it again; None when they would take more than
    ``max_bytes`` (a language model's logits over a large vocabulary), and then `fidelity` runs the reference."""
    kept, size = [], 0
    reference, was_training = _in_eval_mode(reference)
    try:
        with torch.no_grad():
            for _, _, out in _outputs(reference, dataset, split, batch_size):
                size += out.numel() * out.element_size()
                if size > max_bytes:
                    return None
                kept.append(out)
    finally:
        reference.train(was_training)
    return kept


def fidelity(model: nn.Module, reference: nn.Module, dataset: Dataset, split: str = "test", *,
             batch_size: int = 32, outputs: list[torch.Tensor] | None = None) -> dict[str, float | None]:
    """How close ``model``'s outputs stay to ``reference``'s on the same inputs: cosine, KL, top-1.

    ``kl`` and ``top1`` are None for embedding models (their outputs are not distributions).
    ``outputs`` are the reference's, from `reference_outputs` with the same split and batch size.
    """
    pad_id = dataset.info.get("pad_id")
    logits = model_task(reference) != "embedding"
    cos_sum, kl_sum, agree, rows = 0.0, 0.0, 0, 0
    model, was_training = _in_eval_mode(model)
    reference, ref_training = _in_eval_mode(reference)
    refs = outputs if outputs is not None else (ref for _, _, ref in _outputs(reference, dataset, split, batch_size))
    try:
        with torch.no_grad():
            for (x, _, out), ref in zip(_outputs(model, dataset, split, batch_size), refs, strict=True):
                if out.shape != ref.shape:
                    raise ExplorerError(f"The pruned model outputs {tuple(out.shape)} where the dense one outputs "
                                        f"{tuple(ref.shape)}; fidelity compares outputs of the same shape.")
                a, b = _token_rows(x, out.float(), pad_id), _token_rows(x, ref.float(), pad_id)
                cos_sum += float(F.cosine_similarity(a, b, dim=1, eps=1e-12).sum())
                if logits:
                    kl_sum += float(F.kl_div(F.log_softmax(a, 1), F.log_softmax(b, 1), log_target=True,
                                             reduction="sum"))
                    agree += int((a.argmax(1) == b.argmax(1)).sum())
                rows += a.shape[0]
    finally:
        model.train(was_training)
        reference.train(ref_training)
    if rows == 0:
        raise ExplorerError(f"The {split} split of '{dataset.name}' is empty.")
    return {"cosine": cos_sum / rows, "kl": kl_sum / rows if logits else None, "top1": agree / rows if logits else None}


def accuracy(model: nn.Module, dataset: Dataset, split: str = "test", *, batch_size: int = 256) -> float:
    from explorer.train import evaluate

    return float(evaluate(model, dataset, split, batch_size=batch_size)["accuracy"])


def evaluate_task(model: nn.Module, dataset: Dataset, *, reference: nn.Module | None = None, task: str | None = None,
                  split: str = "test", measure: str | None = None,
                  outputs: list[torch.Tensor] | None = None, max_tokens: int | None = None,
                  progress: Callable[[float, str], None] | None = None) -> dict:
    """The task metric of ``model`` on ``split``: ``{name, value, measure, higher_is_better, measures}``.

    ``reference`` (the dense model) is needed for fidelity; fidelity of a model to itself is 1.
    ``outputs``: the reference's outputs kept by `reference_outputs` (fidelity only).
    ``max_tokens``, ``progress``: perplexity's token budget and progress (`perplexity`); the other tasks ignore them.
    """
    task = task or task_for(reference if reference is not None else model, dataset)
    if task not in TASKS:
        raise ExplorerError(f"Unknown task '{task}': use one of {', '.join(TASKS)}.")
    if task == "accuracy":
        value = accuracy(model, dataset, split)
        return {"name": "accuracy", "value": value, "measure": "accuracy", "higher_is_better": True,
                "measures": {"accuracy": value}}
    if task == "perplexity":
        value = perplexity(model, dataset, split, max_tokens=max_tokens, progress=progress)
        return {"name": "perplexity", "value": value, "measure": "perplexity", "higher_is_better": False,
                "measures": {"perplexity": value}}
    measure = measure or default_measure(reference if reference is not None else model)
    if measure not in FIDELITY_MEASURES:
        raise ExplorerError(f"Unknown fidelity measure '{measure}': use one of {', '.join(FIDELITY_MEASURES)}.")
    measures = fidelity(model, reference if reference is not None else clone_model(model), dataset, split,
                        outputs=outputs)
    if measures[measure] is None:
        raise ExplorerError(f"Fidelity '{measure}' needs logits; this model outputs embeddings: use cosine.")
    return {"name": "fidelity", "value": measures[measure], "measure": measure,
            "higher_is_better": HIGHER_IS_BETTER[measure], "measures": measures}


# --------------------------------------------------------------------------- losses


def loss_for(model: nn.Module, dataset: Dataset, loss: str = "auto") -> str:
    """The loss that trains ``model`` on ``dataset``: ``cross_entropy``, ``next_token`` or ``distill``.

    ``auto`` follows the task: labelled classification -> cross-entropy, a causal LM -> the
    next-token loss on the text itself, anything else (unlabelled data, embeddings) -> distillation
    to the dense model. ``distill`` forces distillation for any model.
    """
    if loss not in LOSSES:
        raise ExplorerError(f"Unknown loss '{loss}': use one of {', '.join(LOSSES)}.")
    task = task_for(model, dataset)
    if loss == "auto":
        return {"accuracy": "cross_entropy", "perplexity": "next_token"}.get(task, "distill")
    if loss == "cross_entropy" and task != "accuracy":
        raise ExplorerError(f"Cross-entropy needs a classifier on labelled data; '{dataset.name}' with this model is "
                            f"judged by {task}: use loss auto or distill.")
    if loss == "next_token" and model_task(model) != "causal_lm":
        raise ExplorerError("The next-token loss needs a causal language model: use loss auto or distill.")
    return loss


def next_token_nll_sum(logits: torch.Tensor, ids: torch.Tensor, pad_id: int | None) -> tuple[float, int]:
    """Sum of the next-token negative log-likelihoods whose target is not padding, and their count.

    Perplexity is ``exp(sum / count)`` over all batches; `perplexity` and the streamed
    `explorer.stream.perplexity_folder` both add up these two numbers, so they compare exactly.
    """
    targets = ids[:, 1:]
    keep = targets != pad_id if pad_id is not None else torch.ones_like(targets, dtype=torch.bool)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                          reduction="none")
    return float(nll[keep.reshape(-1)].sum()), int(keep.sum())


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Mean negative log-likelihood of every next token that is not padding: log(perplexity).

    The targets are the ids themselves shifted by one (position t predicts token t+1), as in
    causal LM training and in LLM-Pruner's calibration (Ma et al. 2023).
    """
    if logits.ndim != 3:
        raise ExplorerError(f"The next-token loss needs (batch, length, vocab) logits; got {tuple(logits.shape)}.")
    targets = ids[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, -100)
    if not bool((targets != -100).any()):
        raise ExplorerError("The batch has no token to predict (every next token is padding).")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, pad_id: int | None, *,
                      embedding: bool, temperature: float = 1.0) -> torch.Tensor:
    """How far ``student``'s outputs are from the dense ``teacher``'s on the same inputs (0 when equal).

    Logits: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per output row, averaged
    (Hinton et al. 2015, "Distilling the knowledge in a neural network"; T^2 keeps the gradient's
    scale independent of T). Embeddings: ``1 - cosine(student, teacher)``, the fidelity measure
    itself. Rows are one per input, or one per non-padding token of a sequence output.
    """
    if student.shape != teacher.shape:
        raise ExplorerError(f"The model outputs {tuple(student.shape)} where the dense model outputs "
                            f"{tuple(teacher.shape)}; distillation compares outputs of the same shape.")
    a, b = _token_rows(ids, student.float(), pad_id), _token_rows(ids, teacher.float(), pad_id)
    if embedding:
        return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()
    return F.kl_div(F.log_softmax(a / temperature, 1), F.log_softmax(b / temperature, 1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def sampled_fisher_loss(output: torch.Tensor, ids: torch.Tensor, pad_id: int | None, *, embedding: bool,
                        generator: torch.Generator) -> torch.Tensor:
    """The model's negative log-likelihood of targets drawn from its own predictive distribution.

    At the dense point a distillation loss is flat (the model is its own teacher), so its gradient
    is zero and cannot rank weights. Its curvature there is the Fisher information, and the gradient
    of this loss is an unbiased sample of it: ``E[g g^T] = F`` (the "true" Fisher, Martens 2020,
    "New insights and perspectives on the natural gradient method"; Kunstner et al. 2019 show that
    the label-based empirical Fisher is a poor stand-in for it). Logits: targets ~ softmax(output).
    Embeddings: a Gaussian output model, target = output + N(0, I), loss ``||output - target||^2 / 2``,
    whose Fisher is the Gauss-Newton matrix J^T J; the noise scale rescales every score alike.
    """
    rows = _token_rows(ids, output.float(), pad_id)
    cpu = torch.device("cpu")
    if embedding:
        noise = torch.randn(rows.shape, generator=generator, device=cpu).to(rows.device)
        return 0.5 * (rows - (rows.detach() + noise)).pow(2).sum(1).mean()
    probs = F.softmax(rows.detach(), 1).to(cpu)
    targets = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(rows.device)
    return F.cross_entropy(rows, targets)


def _usable_labels(model: nn.Module, labels: torch.Tensor | None) -> bool:
    """Labels a classifier can learn from: one class index (>= 0) per input; text without labels has -1."""
    return (model_task(model) in (None, "classification") and labels is not None and labels.ndim == 1
            and labels.numel() > 0 and not labels.is_floating_point() and int(labels.min()) >= 0)


def calibration_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None,
                     generator: torch.Generator) -> torch.Tensor:
    """The loss whose gradient scores weights (gradient, taylor, snip; Inspect's gradient view), for any task.

    * classifier with labels: ``cross_entropy(model(x), y)``, as always;
    * causal LM: the next-token loss on the calibration text (LLM-Pruner, Ma et al. 2023);
    * no usable labels (unlabelled text, embeddings): `sampled_fisher_loss`, the sampled-label
      Fisher trick, since self-distillation has zero gradient at the dense model.
    ``generator`` (a CPU generator) makes the sampled targets repeatable.
    """
    output = model(inputs)
    pad_id = getattr(model, "pad_id", None)
    if model_task(model) == "causal_lm":
        return next_token_loss(output, inputs, pad_id)
    if _usable_labels(model, labels):
        return F.cross_entropy(output, labels)
    return sampled_fisher_loss(output, inputs, pad_id, embedding=model_task(model) == "embedding",
                               generator=generator)


def batch_loss(kind: str, output: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, *,
               teacher_output: torch.Tensor | None = None, pad_id: int | None = None, embedding: bool = False,
               temperature: float = 1.0) -> torch.Tensor:
    """The training loss of one batch for a kind from `loss_for` (``teacher_output`` for ``distill``)."""
    if kind == "cross_entropy":
        return F.cross_entropy(output, labels)
    if kind == "next_token":
        return next_token_loss(output, inputs, pad_id)
    if teacher_output is None:
        raise ExplorerError("Distillation needs the dense model's outputs (the teacher).")
    return distillation_loss(output, teacher_output, inputs, pad_id, embedding=embedding, temperature=temperature)
