"""Streaming a model larger than memory (issue 22 item 5): block by block from safetensors shards to shards.

Tiny random GPT-2 (Conv1D, learned positions, tied head) and LLaMA (rotary, GQA, untied head) models are
saved sharded on purpose (several safetensors files and an index), in float32 and bfloat16. The streamed
prune must give the in-memory pipeline's masks (same variant: one-pass vs one-pass, sequential vs
sequential), a folder transformers reloads with the in-memory pruned model's logits, the stored dtype, and
the in-memory perplexity; never more than one block (or the embeddings) in memory.
"""
import dataclasses
import json
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402

from explorer import blocks, hf, llm, pipeline, stream, tasks, text  # noqa: E402
from explorer.cli import main  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.layers import effective_weights  # noqa: E402
from explorer.specs import PlanSpec, ScoringSpec  # noqa: E402


def _tokenizer():
    return hf.tiny_tokenizer("gpt2", vocab_size=300)


def _save(model, tokenizer, folder, dtype):
    model.to(dtype).save_pretrained(folder, max_shard_size="40KB")  # several shards and an index
    tokenizer.save_pretrained(folder)
    return folder


def gpt2_folder(folder, dtype=torch.float32):
    tokenizer = _tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     n_inner=64, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    return _save(transformers.GPT2LMHeadModel(config), tokenizer, folder, dtype)


def llama_folder(folder, dtype=torch.bfloat16):
    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(1)
    return _save(transformers.LlamaForCausalLM(config), tokenizer, folder, dtype)


def opt_folder(folder, dtype=torch.float32):
    tokenizer = _tokenizer()
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=len(tokenizer), max_position_embeddings=64, word_embed_proj_dim=16,
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                                    eos_token_id=tokenizer.eos_token_id)  # project_in / project_out around the blocks
    config.architectures = ["OPTForCausalLM"]
    torch.manual_seed(2)
    return _save(transformers.OPTForCausalLM(config), tokenizer, folder, dtype)


BUILDERS = {"opt-fp32": (opt_folder, torch.float32), "gpt2-fp32": (gpt2_folder, torch.float32), "llama-bf16": (llama_folder, torch.bfloat16),
            "llama-fp32": (llama_folder, torch.float32), "gpt2-bf16": (gpt2_folder, torch.bfloat16)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {name: build(root / name, dtype) for name, (build, dtype) in BUILDERS.items()}


def _in_memory(folder, criterion, sequential, nm=None, protect=()):
    bundle = hf.load_hf(folder)
    dataset = text.text_dataset(bundle.tokenizer, seq_len=bundle.model.seq_len)
    scoring = ScoringSpec(criterion=criterion, calib_samples=4, calib_seqlen=24, calib_mode="windows",
                          sequential=sequential, structure="nm" if nm else "unstructured",
                          nm=f"{nm[0]}:{nm[1]}" if nm else ScoringSpec.nm)
    prepared = pipeline.prepare(bundle.model, scoring, dataset=dataset)
    plan = pipeline.preview(prepared, PlanSpec(sparsity=(nm[1] - nm[0]) / nm[1] if nm else 0.5, protect=protect))
    pruned = pipeline.apply(bundle.model, prepared, plan)
    return bundle, dataset, pipeline.calibration(bundle.model, dataset, scoring), pruned


def _stored_dtypes(folder):
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            dtypes |= {handle.get_tensor(name).dtype for name in handle.keys()}
    return dtypes


CASES = [("gpt2-fp32", "wanda", False), ("opt-fp32", "wanda", True), ("llama-bf16", "wanda", False),
         ("llama-bf16", "wanda", True), ("llama-bf16", "magnitude", False), ("gpt2-fp32", "magnitude", False),
         ("gpt2-fp32", "sparsegpt", True), ("llama-fp32", "sparsegpt", False)]


@pytest.mark.parametrize("name,criterion,sequential", CASES)
def test_streamed_masks_and_reloaded_logits_equal_the_in_memory_prune(folders, tmp_path, name, criterion, sequential):
    source = folders[name]
    bundle, dataset, calib, pruned = _in_memory(source, criterion, sequential)
    out = tmp_path / "out"
    summary = stream.prune_folder(source, out, stream.StreamPlan(criterion, 0.5, sequential=sequential), calib,
                                  dtype="float32")
    assert summary["calibration"] == (None if criterion == "magnitude" else
                                      "sequential" if sequential else "one-pass")
    reloaded = hf.load_hf(out)  # transformers' own loader reads the index and shards
    expected, got = effective_weights(pruned), effective_weights(reloaded.model)
    in_blocks = [key for key in expected if ".h." in key or ".layers." in key]
    assert in_blocks and all(torch.equal(got[key] == 0, expected[key] == 0) for key in in_blocks)
    head = reloaded.model.hf.get_output_embeddings().weight  # copied as it was (tied to the embeddings on GPT-2)
    assert torch.equal(head, bundle.model.hf.get_output_embeddings().weight)
    x = dataset.x_test[:6]
    with torch.no_grad():
        difference = (reloaded.model(x) - pruned(x)).abs().max().item()
    # Wanda and magnitude only zero weights: exact; SparseGPT's updated weights are stored back in fp32 here
    assert difference < 1e-4
    assert _stored_dtypes(out) == _stored_dtypes(source)
    assert summary["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)
    assert sum(r["pruned"] for r in summary["layers"]) == sum(int((expected[k] == 0).sum()) for k in in_blocks)


def _block_and_outside_params(folder):
    """Parameters of the biggest block and of the tensors outside the blocks, from the shards themselves."""
    index = json.loads((folder / stream.INDEX).read_text())["weight_map"]
    sizes = {}
    for name, file in index.items():
        with safe_open(str(folder / file), framework="pt") as handle:
            sizes[name] = handle.get_slice(name).get_shape()
    count = {name: int(torch.tensor(shape).prod()) if shape else 1 for name, shape in sizes.items()}
    per_block: dict = {}
    for name, size in count.items():
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("h", "layers") and parts[i + 1].isdigit():
                per_block[parts[i + 1]] = per_block.get(parts[i + 1], 0) + size
                break
    return max(per_block.values()), sum(count.values()) - sum(per_block.values()), sum(count.values())


@pytest.mark.parametrize("name", ["llama-bf16", "gpt2-bf16"])
def test_bf16_stays_bf16_and_memory_holds_one_block_or_the_embeddings(folders, tmp_path, name):
    source = folders[name]
    bundle = hf.load_hf(source)
    dataset = text.text_dataset(bundle.tokenizer, seq_len=32)
    calib = text.calibration(dataset, 4, 16, "windows")
    summary = stream.prune_folder(source, tmp_path / "out", stream.StreamPlan("wanda", 0.5), calib)
    assert summary["compute_dtype"] == ("bfloat16" if "bf16" in name else "float32")  # auto follows the folder
    assert _stored_dtypes(tmp_path / "out") == {torch.bfloat16 if "bf16" in name else torch.float32}
    block, outside, total = _block_and_outside_params(source)
    assert summary["peak_params"] <= max(block, outside) and summary["peak_params"] < total / 2
    assert {"config.json", "tokenizer_config.json", stream.INDEX} <= {p.name for p in (tmp_path / "out").iterdir()}
    index = json.loads((tmp_path / "out" / stream.INDEX).read_text())
    assert set(index["weight_map"]) == set(json.loads((source / stream.INDEX).read_text())["weight_map"])
    stored = 0
    for file in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            stored += sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in handle.keys())
    assert index["metadata"]["total_size"] == stored
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def _small_test_split(dataset, rows=60):
    return dataclasses.replace(dataset, x_test=dataset.x_test[:rows], y_test=dataset.y_test[:rows])


@pytest.mark.parametrize("name", ["gpt2-fp32", "llama-bf16", "opt-fp32"])
def test_streamed_perplexity_equals_the_in_memory_perplexity(folders, name):
    bundle = hf.load_hf(folders[name])
    dataset = _small_test_split(text.text_dataset(bundle.tokenizer, seq_len=bundle.model.seq_len))
    expected = tasks.perplexity(bundle.model, dataset)
    streamed = stream.perplexity_folder(folders[name], dataset, dtype="float32")
    assert streamed["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert streamed["tokens"] == int((dataset.x_test[:, 1:] != dataset.info["pad_id"]).sum())
    fast = stream.perplexity_folder(folders[name], dataset, max_tokens=16)  # auto dtype, a few batches
    assert fast["batches"] < streamed["batches"] and 0 < fast["tokens"] < streamed["tokens"]


def test_nm_and_protect_stream_as_in_memory(folders, tmp_path):
    source = folders["llama-fp32"]
    _, _, calib, pruned = _in_memory(source, "wanda", False, nm=(2, 4), protect=("hf.model.layers.1.mlp.up_proj",))
    stream.prune_folder(source, tmp_path / "out", stream.StreamPlan("wanda", 0.5, nm=(2, 4),
                                                                     protect=("hf.model.layers.1.mlp.up_proj",)),
                        calib, dtype="float32")
    got, expected = effective_weights(hf.load_hf(tmp_path / "out").model), effective_weights(pruned)
    assert all(torch.equal(got[k] == 0, expected[k] == 0) for k in expected if ".layers." in k)
    assert not (got["hf.model.layers.1.mlp.up_proj"] == 0).any()
    assert (got["hf.model.layers.0.mlp.up_proj"] == 0).float().mean() == 0.5


@pytest.mark.parametrize("count", [0, 1, 5, 7, 12, 16])
def test_lowest_picks_what_a_stable_sort_picks(count):
    torch.manual_seed(count)
    values = torch.randint(0, 4, (5, 16)).float()  # many ties
    chosen = llm.row_lowest(values, count)
    order = torch.argsort(values, dim=1, stable=True)[:, :count]
    expected = torch.zeros_like(chosen).scatter_(1, order, True)
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize("pruned", [0, 3, 40, 64, 70, 128])
def test_row_rank_pick_equals_blocks_wanda_mask(pruned):
    torch.manual_seed(pruned)
    layer = torch.nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-3, 4, (8, 16)).float())  # ties in |W|·‖X‖
    squares = torch.randint(1, 3, (16,)).double()
    ranks = llm._within_row_ranks(layer.weight.detach().abs() * squares.sqrt().float()).reshape(-1)
    expected = torch.ones(ranks.numel(), dtype=torch.bool)
    expected[torch.argsort(ranks, stable=True)[:pruned]] = False  # the sorts both paths used to make
    keep = stream._keep_mask(layer, "wanda", {"x": squares}, "x", pruned, None)
    assert torch.equal(keep, expected.reshape(8, 16))
    assert torch.equal(blocks._wanda_mask(layer, squares, pruned, None), expected.reshape(8, 16))
    assert stream._keep_mask(layer, "wanda", {}, "x", pruned, None) is None  # never reached: left alone


def _args(folder, out, *extra):
    return ["prune", "--model", f"hf:{folder}", "--stream", "--out", str(out), *extra]


def test_cli_streams_a_folder_and_reports_the_perplexity(folders, tmp_path, capsys):
    source = folders["llama-bf16"]
    flags = ["--criterion", "wanda", "--sparsity", "0.5", "--calib-samples", "4", "--calib-seqlen", "16",
             "--calib-mode", "windows", "--sequential", "--eval", "both", "--eval-tokens", "200", "--progress"]
    assert main([*_args(source, tmp_path / "a", *flags), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["stream"] and result["calibration"] == "sequential" and result["sparsity_actual"] == 0.5
    assert result["compute_dtype"] == "bfloat16" and result["perplexity"]["tokens"] > 0
    assert result["perplexity"]["base"] > 1 and result["perplexity"]["pruned"] > 1
    scored, total = result["perplexity"]["eval_tokens"]["scored"], result["perplexity"]["eval_tokens"]["total"]
    assert result["perplexity"]["tokens"] < scored <= 200 < total  # targets: all but each sequence's first token
    assert "block 2 of 2" in captured.err or "block 1 of 2" in captured.err
    assert main(_args(source, tmp_path / "b", "--criterion", "magnitude", "--structure", "nm", "--eval", "none",
                      "--stream-dtype", "float32")) == 0
    text_out = capsys.readouterr().out
    assert "streamed magnitude nm 50%" in text_out and "float32 compute" in text_out
    assert main(_args(source, tmp_path / "c", "--criterion", "magnitude", "--sparsity", "0.3",
                      "--eval-tokens", "100")) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "test perplexity" in line)
    first = re.search(r"\(streamed\), on the first ([\d,]+) of ([\d,]+) test tokens; --eval-tokens 0 for all$", line)
    assert first and int(first[1].replace(",", "")) <= 100 and int(first[2].replace(",", "")) == total


@pytest.mark.parametrize("extra,words", [
    (["--scope", "global"], "global scope"),
    (["--structure", "channel"], "--structure channel"),
    (["--include-head"], "--include-head"),
    (["--plan-only"], "--plan-only"),
    (["--measure"], "--measure"),
    (["--save", "x.pt"], "use --out DIR"),
    (["--sparsity", "0.3,0.5"], "one --sparsity"),
    (["--data", "digits"], "--data text"),
    (["--criterion", "gradient"], "needs the whole model"),
    (["--criterion", "magnitude", "--sequential"], "no sequential variant"),
    (["--protect", "hf.lm_head"], "no such layer"),
    (["--structure", "nm", "--sparsity", "0.3"], "fixes the sparsity"),
])
def test_cli_refuses_what_streaming_cannot_do_in_one_line(folders, tmp_path, capsys, extra, words):
    flags = ["--sparsity", "0.5"] if "--sparsity" not in extra else []
    assert main(_args(folders["gpt2-fp32"], tmp_path / "o", "--criterion", "wanda", *flags, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_bad_folders_are_one_line(folders, tmp_path, capsys):
    source = folders["gpt2-fp32"]
    assert main(["prune", "--model", "tiny_gpt2", "--stream", "--sparsity", "0.5", "--out", str(tmp_path)]) == 2
    assert "hf:FOLDER" in capsys.readouterr().err
    assert main(["prune", "--model", f"hf:{source}", "--stream", "--sparsity", "0.5"]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["prune", "--model", f"hf:{source}", "--stream", "--out", str(tmp_path)]) == 2
    assert "--sparsity is required" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExplorerError, match="not an empty folder"):
        stream.prune_folder(source, tmp_path / "full", stream.StreamPlan("magnitude"))
    with pytest.raises(ExplorerError, match="own folder"):
        stream.prune_folder(source, source, stream.StreamPlan("magnitude"))
    with pytest.raises(ExplorerError, match="needs calibration"):
        stream.prune_folder(source, tmp_path / "new", stream.StreamPlan("wanda"))
    with pytest.raises(ExplorerError, match="Sparsity must be"):
        stream.StreamPlan("wanda", 1.5).validate()
    with pytest.raises(ExplorerError, match="not a Hugging Face model folder"):
        stream.open_folder(tmp_path / "nowhere")
    # a missing shard, a damaged shard, an unreadable index, no safetensors at all
    broken = shutil.copytree(source, tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ExplorerError, match="lacks the shard"):
        stream.open_folder(broken)
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(ExplorerError, match="damaged"):
        stream.Folder(broken, None, json.loads((broken / stream.INDEX).read_text())["weight_map"]).read(
            [n for n, f in json.loads((broken / stream.INDEX).read_text())["weight_map"].items() if f == shard.name])
    (broken / stream.INDEX).write_text("{")
    with pytest.raises(ExplorerError, match="unreadable"):
        stream.open_folder(broken)
    (broken / stream.INDEX).unlink()
    for file in broken.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(ExplorerError, match="no safetensors weights"):
        stream.open_folder(broken)
    (broken / stream.SINGLE).write_bytes(b"junk")
    with pytest.raises(ExplorerError, match="not a readable safetensors"):
        stream.open_folder(broken)


def test_single_file_folders_stream_and_other_models_are_refused(tmp_path):
    bundle = hf.builtin("tiny_gpt2")
    single = hf.save_hf(bundle.model, bundle.tokenizer, tmp_path / "single")  # one model.safetensors
    assert (single / stream.SINGLE).is_file() and not (single / stream.INDEX).exists()
    dataset = _small_test_split(text.text_dataset(bundle.tokenizer, seq_len=32))
    assert stream.perplexity_folder(single, dataset, dtype="float32")["perplexity"] == pytest.approx(
        tasks.perplexity(hf.load_hf(single).model, dataset), rel=1e-5)
    bert = hf.builtin("tiny_bert")
    with pytest.raises(ExplorerError, match="causal language models"):
        stream.open_folder(hf.save_hf(bert.model, bert.tokenizer, tmp_path / "bert"))
    with pytest.raises(ExplorerError, match="Compute dtype"):
        stream._compute_dtype(stream.open_folder(single), "int8")
    (single / "tokenizer_config.json").write_text("{")
    with pytest.raises(ExplorerError, match="tokenizer"):
        stream.load_tokenizer(stream.open_folder(single))
