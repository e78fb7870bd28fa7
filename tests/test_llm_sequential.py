"""Sequential and one-pass calibration against a plain re-implementation of the papers' reference loops.

The reference below follows locuslab/wanda ``lib/prune.py`` (``prepare_calibration_input``, ``prune_wanda``)
and IST-DASLab/sparsegpt (``opt.py`` / ``llama.py`` sequential loop, ``sparsegpt.py`` ``fasterprune``):
catch block 0's inputs, then per block hook its Linears, run it, prune, run it again for the next block.
Two deliberate differences, the same in ours: precision (Wanda's Σx² in float64, the Hessian's inverse
Cholesky in float64) and SparseGPT's per-block count (exactly ``sparsity x block``, where the reference's
``tmp <= sorted[int(n·s)]`` takes one more).
"""
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from explorer import blocks, hf, llm, masking, pipeline, planner  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.layers import clone_model, effective_weight  # noqa: E402
from explorer.specs import ModelSpec, PlanSpec, ScoringSpec  # noqa: E402


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return hf.builtin("tiny_gpt2").model
    if kind == "opt":
        config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                                        vocab_size=120, word_embed_proj_dim=32, max_position_embeddings=64)
        return hf.wrap_hf(transformers.OPTForCausalLM(config), pad_id=1)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=120, max_position_embeddings=64)
    return hf.wrap_hf(transformers.LlamaForCausalLM(config), pad_id=0)


def calibration(vocab: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(3, vocab, (2, 24), generator=generator), None) for _ in range(3)]


# ------------------------------------------------------------------ the reference, written plainly
def reference_stack(model):
    hf_model = model.hf
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        try:
            return hf_model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError("no stack")


def reference_inputs(model, calib):
    """The reference's Catcher: block 0's hidden states and keyword arguments per batch."""
    stack, caught = reference_stack(model), []

    class Stop(Exception):
        pass

    def catch(module, args, kwargs):
        caught.append((args[0], kwargs))
        raise Stop

    handle = stack[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids, _ in calib:
        try:
            model(ids)
        except Stop:
            pass
    handle.remove()
    return caught


def run_layer(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def fasterprune(weight, hessian, sparsity, blocksize=128, percdamp=0.01):
    """SparseGPT's column sweep as ``sparsegpt.py`` writes it (exact count per block)."""
    W, H = weight.clone().float(), hessian.clone().double()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
        tmp[:, dead[i1:i2]] = 0
        count = round(sparsity * W.shape[0] * i2) - round(sparsity * W.shape[0] * i1)
        mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
        mask1[torch.argsort(tmp.flatten(), stable=True)[:count]] = True
        mask1 = mask1.reshape(tmp.shape)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, pruned


def reference_prune(model, calib, method: str, sparsity: float, sequential: bool):
    """A pruned copy the reference way; one-pass takes every block's statistics from the dense model."""
    model = clone_model(model)
    stack = reference_stack(model)
    inputs = reference_inputs(model, calib)
    dense_inputs = []
    if not sequential:  # each block's inputs from the dense model
        hidden = [h for h, _ in inputs]
        for layer in stack:
            dense_inputs.append(hidden)
            with torch.no_grad():
                hidden = [run_layer(layer, h, kw) for h, (_, kw) in zip(hidden, inputs)]
    hidden = [h for h, _ in inputs]
    with torch.no_grad():
        for index, layer in enumerate(stack):
            subset = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
            squares, hessians, rows = {}, {}, {}

            def hook(name):
                def add(module, inp, out):
                    x = inp[0].reshape(-1, inp[0].shape[-1])
                    squares[name] = squares.get(name, 0) + x.double().pow(2).sum(0)
                    hessians[name] = hessians.get(name, 0) + x.float().t() @ x.float()
                    rows[name] = rows.get(name, 0) + x.shape[0]
                return add
            handles = [m.register_forward_hook(hook(name)) for name, m in subset.items()]
            feed = hidden if sequential else dense_inputs[index]
            for h, (_, kw) in zip(feed, inputs):
                run_layer(layer, h, kw)
            for handle in handles:
                handle.remove()
            for name, module in subset.items():
                W = module.weight.data
                if method == "wanda":
                    metric = W.abs() * squares[name].sqrt().float().reshape(1, -1)
                    order = torch.sort(metric, dim=-1, stable=True)[1]
                    lowest = order[:, :int(W.shape[1] * sparsity)]
                    W[torch.zeros_like(W, dtype=torch.bool).scatter_(1, lowest, True)] = 0
                else:
                    module.weight.data, _ = fasterprune(W, hessians[name] * (2 / rows[name]), sparsity)
            hidden = [run_layer(layer, h, kw) for h, (_, kw) in zip(hidden, inputs)]
    return model


# ------------------------------------------------------------------------------- ours
def ours(model, calib, method: str, sparsity: float, sequential: bool):
    names = [n for n in llm.llm_layers(model) if n not in blocks.outside_blocks(model)]
    pruned = clone_model(model)
    if sequential:
        blocks.sequential_prune(pruned, calib, method,
                                {n: round(sparsity * model.get_submodule(n).weight.numel()) for n in names})
    elif method == "wanda":
        ranking = planner.prepare(llm.wanda_scores(model, calib, layers=names))
        pruned = masking.apply(model, planner.plan(ranking, sparsity, "local"), ranking)
    else:
        llm.sparsegpt_prune(pruned, llm.hessians(model, calib, layers=names), sparsity)
    return pruned, names


def zeros(model, names):
    return {name: effective_weight(model.get_submodule(name)) == 0 for name in names}


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_equal_the_reference_loop_one_pass_and_sequential_and_the_two_differ(kind, method):
    model = tiny(kind)
    calib = calibration(model.hf.config.vocab_size)
    differing = 0
    found = {}
    for sequential in (False, True):
        pruned, names = ours(model, calib, method, 0.5, sequential)
        expected = reference_prune(model, calib, method, 0.5, sequential)
        for name, mask in zeros(pruned, names).items():
            assert torch.equal(mask, zeros(expected, [name])[name]), (kind, method, sequential, name)
            if method == "sparsegpt":
                assert torch.allclose(effective_weight(pruned.get_submodule(name)),
                                      effective_weight(expected.get_submodule(name)), atol=1e-5), name
        found[sequential] = zeros(pruned, names)
        assert blocks.outside_blocks(model) == ["hf.lm_head"]
        assert torch.equal(effective_weight(pruned.hf.lm_head), model.hf.lm_head.weight)
    for name in found[False]:
        differing += int((found[False][name] != found[True][name]).sum())
    assert differing > 0  # later blocks see pruned inputs: sequential moves some mask entries


def test_sequential_refuses_what_it_cannot_do():
    model = tiny("gpt2")
    calib = calibration(100)
    with pytest.raises(ExplorerError, match="for wanda and sparsegpt"):
        blocks.sequential_prune(clone_model(model), calib, "magnitude", {})
    with pytest.raises(ExplorerError, match="outside them"):
        blocks.sequential_prune(clone_model(model), calib, "wanda", {"hf.lm_head": 10})
    with pytest.raises(ExplorerError, match="with a stack of blocks; this model has none"):
        blocks.sequential_prune(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], "wanda", {"0": 8})

    with pytest.raises(ExplorerError, match="sequential calibration is for wanda and sparsegpt"):
        ScoringSpec(criterion="magnitude", sequential=True).validate()


def test_the_pipeline_and_cli_name_the_calibration_and_prune_sequentially(capsys):
    model, dataset, _ = pipeline.resolve_model(ModelSpec("tiny_gpt2", data="text"))
    scoring = ScoringSpec(criterion="wanda", calib_samples=4, calib_seqlen=32, calib_mode="windows", sequential=True)
    prepared = pipeline.prepare(model, scoring, dataset=dataset)
    plan = pipeline.preview(prepared, PlanSpec(sparsity=0.5))
    seen = []
    pruned = pipeline.apply(model, prepared, plan, progress=lambda fraction, text: seen.append(fraction))
    expected = clone_model(model)
    blocks.sequential_prune(expected, pipeline.calibration(model, dataset, scoring), "wanda",
                            {lp.name: lp.pruned for lp in plan.layers})
    assert seen[-1] == 1.0 and len(seen) == 2  # one step a block
    for name in prepared.names:
        assert torch.equal(effective_weight(pruned.get_submodule(name)), effective_weight(expected.get_submodule(name)))
    base = ["prune", "--model", "tiny_gpt2", "--criterion", "wanda", "--sparsity", "0.5", "--calib-samples", "4",
            "--calib-seqlen", "32", "--calib-mode", "windows", "--json"]
    results = {}
    for extra in ([], ["--sequential"]):
        assert main([*base, *extra]) == 0
        results[bool(extra)] = json.loads(capsys.readouterr().out)
    assert results[False]["calibration"] == "one-pass" and results[True]["calibration"] == "sequential"
    assert results[True]["recipe"]["scoring"]["sequential"] is True
    assert results[True]["task"]["pruned"] != results[False]["task"]["pruned"]  # different masks, another perplexity
