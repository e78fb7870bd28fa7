"""Measuring a language model without materialising what is not needed: same numbers, less memory and time."""
import io
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from explorer import measure, pipeline, tasks
from explorer.specs import ModelSpec


@pytest.fixture(scope="module")
def gpt2():
    model, dataset, _ = pipeline.resolve_model(ModelSpec("tiny_gpt2", data="text"))
    return model, dataset


def test_compressed_size_is_the_deflate_size_of_the_whole_serialised_state_dict(gpt2):
    model, _ = gpt2
    buffer = io.BytesIO()
    torch.save(measure.as_deployed(model).state_dict(), buffer)
    raw = buffer.getvalue()
    assert measure.compressed_size_bytes(model) == {"raw": len(raw), "compressed": len(zlib.compress(raw, 6))}


@pytest.mark.parametrize("source", ["tiny_gpt2", "lenet5"])
def test_peak_memory_estimate_equals_one_full_batch_pass(gpt2, source):
    if source == "tiny_gpt2":
        model, dataset = gpt2
    else:
        model, dataset, _ = pipeline.resolve_model(ModelSpec(source, baseline=False))
    example = dataset.example_input(7)
    outputs = [example.numel() * example.element_size()]
    leaves = [m for m in model.modules() if not list(m.children())]

    def record(module, inputs, output):
        for tensor in (output if isinstance(output, (tuple, list)) else [output]):
            if isinstance(tensor, torch.Tensor):
                outputs.append(tensor.numel() * tensor.element_size())
    handles = [m.register_forward_hook(record) for m in leaves]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert measure.peak_memory_bytes(model, example)["bytes"] == state + sum(outputs)


def test_perplexity_with_trimmed_sorted_batches_equals_padded_batches(gpt2):
    model, dataset = gpt2
    x, _ = dataset.split("test")
    pad = dataset.info["pad_id"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), 32):  # the plain way: padded batches, padding masked out of the mean
            ids = x[start:start + 32]
            logits = model(ids)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none")
            keep = ids[:, 1:].reshape(-1) != pad
            total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    assert (x == pad).float().mean() > 0.3  # most of the padded grid is padding: trimming matters
    assert tasks.perplexity(model, dataset) == pytest.approx(math.exp(total / count), rel=1e-5)
    batches = list(tasks._trimmed_batches(dataset, "test", 32, pad))
    assert sum(len(b) for b in batches) == len(x) and all(b.numel() <= 32 * x.shape[1] for b in batches)
    assert sum(int((b != pad).sum()) for b in batches) == int((x != pad).sum())  # no real token lost


def test_the_cli_prints_each_slow_stage_to_stderr_with_progress(capsys):
    from explorer.cli import main

    flags = ["prune", "--model", "tiny_gpt2", "--criterion", "wanda", "--sparsity", "0.5", "--calib-samples", "4",
             "--calib-seqlen", "32", "--calib-mode", "windows", "--sequential", "--json"]
    assert main([*flags, "--progress"]) == 0
    captured = capsys.readouterr()
    stages = [line.split("] ", 1)[1] for line in captured.err.splitlines()]
    measuring = next(i for i, stage in enumerate(stages) if stage.startswith("measuring the pruned copy at 0.5"))
    assert stages[0].startswith("loading") and stages.index("wanda sequential: block 2 of 2 (100%)") < measuring
    assert main(flags) == 0 and capsys.readouterr().err == ""  # quiet unless asked


def test_a_large_vocabulary_gets_fewer_tokens_a_batch_and_the_same_perplexity(gpt2, monkeypatch):
    model, dataset = gpt2
    expected = tasks.perplexity(model, dataset)
    vocab = model.hf.config.vocab_size
    monkeypatch.setattr(tasks, "LOGIT_BUDGET", 40 * vocab)  # 40 tokens of logits a batch
    seen = []
    original = tasks._trimmed_batches
    monkeypatch.setattr(tasks, "_trimmed_batches",
                        lambda *a, **k: (seen.append(b) or b for b in original(*a, **k)))
    assert tasks.perplexity(model, dataset) == pytest.approx(expected, rel=1e-5)
    longest = int((dataset.split("test")[0] != dataset.info["pad_id"]).sum(1).max())
    assert max(b.numel() for b in seen) <= max(40, longest) and len(seen) > 10
