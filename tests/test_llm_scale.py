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
    deflate = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)  # the run-length strategy
    compressed = len(deflate.compress(raw)) + len(deflate.flush())
    assert len(raw) < measure.DEFLATE_BLOCK  # one block: one stream
    assert measure.compressed_size_bytes(model) == {"raw": len(raw), "compressed": compressed}
    assert abs(compressed / len(zlib.compress(raw, 6)) - 1) < 0.02  # what the default strategy gives, within 2 %


@pytest.mark.parametrize("block", [4096, 100_003])
def test_a_larger_file_is_deflated_in_independent_blocks(gpt2, monkeypatch, block):
    """Blocks of DEFLATE_BLOCK bytes, each its own zlib stream, whatever sizes torch.save writes in."""
    model, _ = gpt2
    buffer = io.BytesIO()
    torch.save(measure.as_deployed(model).state_dict(), buffer)
    raw = buffer.getvalue()

    def deflated(piece):
        deflate = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
        return len(deflate.compress(piece)) + len(deflate.flush())

    monkeypatch.setattr(measure, "DEFLATE_BLOCK", block)
    expected = sum(deflated(raw[start:start + block]) for start in range(0, len(raw), block))
    assert measure.compressed_size_bytes(model) == {"raw": len(raw), "compressed": expected}
    assert abs(expected / deflated(raw) - 1) < 0.01  # the blocks cost next to nothing


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


def test_a_token_budget_scores_the_first_test_sequences_that_fit_it(gpt2):
    model, dataset = gpt2
    x, _ = dataset.split("test")
    pad = dataset.info["pad_id"]
    used = ((x != pad) * torch.arange(1, x.shape[1] + 1)).max(dim=1).values  # tokens up to the last real one
    fits = int((used.cumsum(0) <= 300).sum())
    assert 1 < fits < len(x)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in x[:fits]:  # one sequence at a time, padding masked: an independent sum
            logits = model(ids[None])[0]
            keep = ids[1:] != pad
            nll = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
            total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    assert tasks.perplexity(model, dataset, max_tokens=300) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert tasks.perplexity(model, dataset, max_tokens=1) == pytest.approx(  # always at least one sequence
        tasks.perplexity(model, dataset, max_tokens=int(used[0])), rel=1e-6)


def test_measure_run_bounds_both_perplexities_and_can_skip_the_memory_estimate(gpt2):
    from explorer.specs import MeasureSpec

    model, dataset = gpt2
    pruned = pipeline.apply(model, *_magnitude_plan(model, dataset))
    m = pipeline.measure_run(model, pruned, dataset, MeasureSpec(latency=False, eval_tokens=300), peak_memory=False)
    assert m["task"]["base"] == pytest.approx(tasks.perplexity(model, dataset, max_tokens=300), rel=1e-6)
    assert m["task"]["pruned"] == pytest.approx(tasks.perplexity(measure.as_deployed(pruned), dataset,
                                                                 max_tokens=300), rel=1e-6)
    assert m["peak_memory_bytes"] is None and m["size_compressed_bytes"] > 0
    figures = measure.measure_baseline(model, dataset.example_input(1))
    again = pipeline.measure_run(model, pruned, dataset, MeasureSpec(latency=False), base_figures=figures)
    assert again["baseline_size_compressed_bytes"] == measure.compressed_size_bytes(model)["compressed"]
    assert again["baseline_flops_effective"] == measure.flops(model, dataset.example_input(1))["effective"]
    with pytest.raises(Exception, match="eval_tokens must be a whole number from 0 .* 0 scores the whole test split"):
        MeasureSpec(eval_tokens=-1).validate()


def _budget_by_hand(dataset, budget):
    """(scored, total) tokens counted sequence by sequence, each up to its last real token: the budget's count."""
    x, _ = dataset.split("test")
    pad = dataset.info["pad_id"]
    used = [max([i + 1 for i, token in enumerate(row.tolist()) if token != pad] or [1]) for row in x]
    scored = 0
    for index, length in enumerate(used):
        if index and budget is not None and scored + length > budget:
            break
        scored += length
    return scored, sum(used)


def test_by_default_both_perplexities_read_the_first_test_tokens_of_the_budget_and_say_how_many(gpt2):
    from explorer.specs import DEFAULT_EVAL_TOKENS, MeasureSpec

    model, dataset = gpt2
    pruned = pipeline.apply(model, *_magnitude_plan(model, dataset))
    assert MeasureSpec().eval_tokens == DEFAULT_EVAL_TOKENS == 1024
    m = pipeline.measure_run(model, pruned, dataset, MeasureSpec(latency=False), peak_memory=False)
    scored, total = _budget_by_hand(dataset, DEFAULT_EVAL_TOKENS)
    assert m["task"]["tokens"] == {"scored": scored, "total": total}
    longest = dataset.split("test")[0].shape[1]
    assert DEFAULT_EVAL_TOKENS - longest < scored <= DEFAULT_EVAL_TOKENS < total  # the next sequence would not fit
    assert m["task"]["base"] == pytest.approx(tasks.perplexity(model, dataset, max_tokens=DEFAULT_EVAL_TOKENS),
                                              rel=1e-6)
    assert m["task"]["pruned"] == pytest.approx(tasks.perplexity(measure.as_deployed(pruned), dataset,
                                                                 max_tokens=DEFAULT_EVAL_TOKENS), rel=1e-6)
    whole = pipeline.measure_run(model, pruned, dataset, MeasureSpec(latency=False, eval_tokens=0), peak_memory=False)
    assert whole["task"]["tokens"] == {"scored": total, "total": total}
    assert whole["task"]["base"] == pytest.approx(tasks.perplexity(model, dataset), rel=1e-6)
    assert whole["task"]["base"] != pytest.approx(m["task"]["base"], rel=1e-3)  # other tokens, another value
    assert MeasureSpec(eval_tokens=None).validate().token_budget is None  # a run stored before the default: all
    assert tasks.tokens_phrase(m["task"]["tokens"], hint="--eval-tokens 0 for all") == \
        f"on the first {scored:,} of {total:,} test tokens; --eval-tokens 0 for all"
    assert tasks.tokens_phrase(whole["task"]["tokens"], hint="unused") == f"on all {total:,} test tokens"
    assert tasks.eval_tokens(dataset, "test", 1) == (_budget_by_hand(dataset, 1)[0], total)  # always one sequence


def _magnitude_plan(model, dataset):
    from explorer.specs import PlanSpec, ScoringSpec

    prepared = pipeline.prepare(model, ScoringSpec(criterion="magnitude"), dataset=dataset)
    return prepared, pipeline.preview(prepared, PlanSpec(sparsity=0.5))


def test_the_base_figures_reuse_the_plans_flop_trace_while_the_model_is_unchanged(gpt2, monkeypatch):
    from explorer.specs import ScoringSpec

    model, dataset = gpt2
    model = pipeline.clone_model(model)  # a fresh object: nothing remembered yet
    traced, real = [], measure.flops
    monkeypatch.setattr(measure, "flops", lambda *a, **k: traced.append(a[0]) or real(*a, **k))
    example = dataset.example_input(64)
    pipeline.prepare(model, ScoringSpec(criterion="magnitude"), dataset=dataset, lean=True)
    figures = measure.measure_baseline(model, example)
    assert len(traced) == 1  # the plan's trace, read again by the base figures
    assert figures["flops_effective"] == real(model, example[:1])["effective"]
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)  # an in-place edit: traced again
    measure.measure_baseline(model, example)
    assert len(traced) == 2
