"""Calibration as the papers shape it: padding ignored, windows from the token stream or lines, in CLI and recipes."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from explorer import llm, pipeline, text  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.recipe import Recipe  # noqa: E402
from explorer.specs import ScoringSpec  # noqa: E402
from tests.test_llm_blocks import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(tied=False)


def padded(ids: torch.Tensor, pad_id: int, extra: int) -> torch.Tensor:
    """The same sequences with ``extra`` padding positions after each (right padding)."""
    return torch.cat([ids, torch.full((ids.shape[0], extra), pad_id, dtype=ids.dtype)], dim=1)


def test_padding_a_batch_changes_neither_wanda_norms_nor_hessians_nor_the_mask(llama):
    model, dataset = llama
    ids = text.calibration(dataset, 4, 12, "windows")[0][0]
    long = padded(ids, model.pad_id, 24)  # two thirds of the rows are padding
    raw, raw_padded = llm.wanda_raw(model, [ids]), llm.wanda_raw(model, [long])
    hs, hs_padded = llm.hessians(model, [ids]), llm.hessians(model, [long])
    for name in raw:
        assert torch.allclose(raw[name], raw_padded[name], rtol=1e-4, atol=1e-6), name
        assert torch.allclose(hs[name], hs_padded[name], rtol=1e-4, atol=1e-6), name
    ranks = llm.wanda_scores(model, [ids])
    assert all(torch.equal(ranks[k] < 0.5, llm.wanda_scores(model, [long])[k] < 0.5) for k in ranks)
    # independent: the norms of the real tokens' inputs, hooked by hand; padding's would have changed them
    name = "hf.model.layers.1.mlp.down_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(long)
    handle.remove()
    real, every = seen[0][:, :12].reshape(-1, 64), seen[0].reshape(-1, 64)
    weight = model.get_submodule(name).weight.abs()
    assert torch.allclose(raw_padded[name], weight * real.double().norm(dim=0).float(), rtol=1e-4)
    assert not torch.allclose(raw_padded[name], weight * every.double().norm(dim=0).float(), rtol=1e-3)
    assert torch.allclose(hs_padded[name], 2 / real.shape[0] * real.t() @ real, rtol=1e-4, atol=1e-6)


def test_windows_are_cut_from_the_token_stream_and_lines_are_single_examples(llama):
    _, dataset = llama
    tokenizer, texts = dataset.info["tokenizer"], dataset.info["train_texts"]
    stream = [t for row in tokenizer(list(texts))["input_ids"] for t in row]
    windows = text.calibration(dataset, 10, 200, "windows", seed=3)
    assert [tuple(b[0].shape) for b in windows] == [(10, 200)]  # 4,096 tokens a batch at most: 20 windows fit
    joined = " ".join(map(str, stream))
    for row in windows[0][0].tolist():
        assert " ".join(map(str, row)) in joined  # a contiguous slice of the stream, no padding
    assert torch.equal(windows[0][0], text.calibration(dataset, 10, 200, "windows", seed=3)[0][0])
    assert not torch.equal(windows[0][0], text.calibration(dataset, 10, 200, "windows", seed=4)[0][0])
    lines = torch.cat([b[0] for b in text.calibration(dataset, 300, 16, "lines")])
    assert lines.shape == (300, 16)
    single = {tuple(row[:16]) for row in tokenizer(list(texts))["input_ids"]}
    pad = dataset.info["pad_id"]
    for row in lines.tolist():
        real = [t for t in row if t != pad]
        assert tuple(real) in single and row[len(real):] == [pad] * (16 - len(real))
    assert len(text.calibration(dataset, 300, 2048, "windows")) == 150  # 2 windows of 2,048 a batch


def test_bad_calibration_shapes_are_one_clear_error(llama):
    model, dataset = llama
    with pytest.raises(ExplorerError, match="fewer than one window"):
        text.calibration(dataset, 1, 10**7, "windows")
    with pytest.raises(ExplorerError, match="longer than the model's 64 positions"):
        pipeline.calibration(model, dataset, ScoringSpec(criterion="wanda", calib_seqlen=65))
    with pytest.raises(ExplorerError, match="calib_mode must be one of lines, windows"):
        ScoringSpec(calib_mode="chunks").validate()
    with pytest.raises(ExplorerError, match="not tokenised text"):
        text.calibration(pipeline.resolve_model(pipeline.ModelSpec("mlp", baseline=False))[1], 1, 8)
    calib = pipeline.calibration(model, dataset, ScoringSpec(criterion="wanda", calib_samples=3, calib_mode="windows"))
    assert [tuple(b[0].shape) for b in calib] == [(3, 32)]  # the dataset's own length by default


def test_the_cli_and_a_recipe_shape_calibration_alike(capsys, tmp_path):
    flags = ["prune", "--model", "tiny_gpt2", "--criterion", "wanda", "--sparsity", "0.5", "--plan-only", "--json",
             "--calib-samples", "6", "--calib-seqlen", "40", "--calib-mode", "windows"]
    assert main(flags) == 0
    result = json.loads(capsys.readouterr().out)
    scoring = result["recipe"]["scoring"]
    assert (scoring["calib_samples"], scoring["calib_seqlen"], scoring["calib_mode"]) == (6, 40, "windows")
    recipe = Recipe.from_dict(result["recipe"])
    assert recipe.scoring == ScoringSpec(criterion="wanda", calib_samples=6, calib_seqlen=40, calib_mode="windows")
    model, dataset, _ = pipeline.resolve_model(recipe.model)
    prepared = pipeline.prepare(model, recipe.scoring, dataset=dataset)
    layers = pipeline.preview(prepared, recipe.plan).layers
    assert [lp.kept for lp in layers] == [layer["kept"] for layer in result["layers"]]
    assert np.isclose(result["sparsity_actual"], 0.5)
    with pytest.raises(SystemExit) as exit_:
        main([*flags[:-1], "sliding"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
