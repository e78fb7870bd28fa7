"""Text data for transformers: a built-in corpus of real English, user files, token-id datasets.

* `corpus`: sentences people wrote, found on every machine with no download: the documentation
  strings of a fixed list of Python standard-library modules.
* `read_text_file`: a user's ``.txt`` (one example a line), ``.jsonl`` (``text`` and an optional
  ``label``) or ``.csv`` (a ``text`` column and an optional ``label`` column).
* `text_dataset`: either of them tokenised with a model's tokenizer into an `explorer.data.Dataset`
  of (N, seq_len) token ids, right-padded with the tokenizer's pad id and split 80/10/10 with a
  seeded permutation, so `Dataset.batches`, `calibration` and `example_input` work unchanged.
"""
from __future__ import annotations

import csv
import functools
import importlib
import inspect
import io
import json
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from explorer.data import Dataset
from explorer.errors import ExplorerError

CORPUS_MODULES = """
abc argparse array ast asyncio base64 bisect bz2 calendar cmd codecs collections concurrent.futures configparser
contextlib contextvars copy csv dataclasses datetime decimal difflib dis doctest email email.message email.parser
enum fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html.parser http.client
http.cookies http.server imaplib importlib inspect io ipaddress itertools json json.decoder json.encoder locale
logging logging.handlers lzma mailbox mimetypes multiprocessing numbers operator optparse os os.path pathlib pickle
pkgutil platform plistlib poplib pprint queue random re sched secrets selectors shelve shlex shutil signal smtplib
socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap threading timeit
tokenize trace traceback types typing unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref
xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo
""".split()
MIN_WORDS, MAX_WORDS = 6, 60
MIN_EXAMPLES = 10  # 80/10/10 leaves at least one example in validation and test
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CODE_MARKS = ("`", "|", "==", "->", "()", "[", "{", "__", "::", ">>>")


def _docstrings(module) -> Iterator[str]:
    """The docstrings of a module and of the classes, functions and methods it defines."""
    seen: set[int] = set()

    def visit(obj, top: bool) -> Iterator[str]:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(getattr(obj, "__doc__", None), str):
            yield obj.__doc__
        if top or inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if ((inspect.isclass(member) or inspect.isfunction(member))
                        and getattr(member, "__module__", None) == module.__name__):
                    yield from visit(member, False)

    yield from visit(module, True)


def _sentences(doc: str) -> Iterator[str]:
    """Prose sentences of one docstring: code, doctests, indented blocks and tables are dropped."""
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t")) or line.lstrip().startswith((">>>", "...", "$ ")) for line in lines):
            continue
        for sentence in _SENTENCE_END.split(" ".join(line.strip() for line in lines)):
            sentence = " ".join(sentence.split())
            if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                continue
            if not sentence[0].isupper() or sentence[-1] not in ".!?" or any(m in sentence for m in _CODE_MARKS):
                continue
            chars = sentence.replace(" ", "")
            if sum(c.isalpha() for c in chars) >= 0.85 * len(chars):
                yield sentence


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Real English sentences from Python standard-library docstrings, in a fixed shuffled order.

    Sentences of 6-60 words that are mostly letters, deduplicated, sorted, then shuffled with a fixed
    seed, so every machine with the same Python version gets the same list (about 4,000 sentences
    on 3.11; docstrings change between Python versions, so other versions give a slightly different
    list). Docstrings are absent under ``python -OO``, which is reported rather than returned empty.
    """
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a build without ssl or sqlite3 just gives fewer sentences
                continue
            for doc in _docstrings(module):
                found.update(_sentences(doc))
    if len(found) < 100:
        raise ExplorerError(f"Only {len(found)} sentences found in the standard library's docstrings "
                            f"(python -OO strips them; flags: optimize={sys.flags.optimize}); run without -OO.")
    sentences = sorted(found)
    random.Random(0).shuffle(sentences)
    return tuple(sentences)


# --------------------------------------------------------------------------- user files
def _label_ids(raw: list, label: str) -> tuple[list[int], tuple[str, ...]]:
    """Integer labels stay as they are (names "0".."K-1"); string labels get ids in sorted order."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        if min(raw) < 0:
            raise ExplorerError(f"'{label}': integer labels must be >= 0; found {min(raw)}.")
        return list(raw), tuple(str(c) for c in range(max(raw) + 1))
    if all(isinstance(v, str) for v in raw):
        names = tuple(sorted(set(raw)))
        index = {name: i for i, name in enumerate(names)}
        return [index[v] for v in raw], names
    raise ExplorerError(f"'{label}': labels must be all integers or all strings.")


def _jsonl_rows(lines: list[str], label: str) -> Iterator[tuple[int, str, object]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExplorerError(f"'{label}' line {number} is not valid JSON ({exc.msg}); "
                                "each line must be an object like {\"text\": \"...\", \"label\": ...}.") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ExplorerError(f"'{label}' line {number} has no \"text\" string; "
                                "each line must be an object like {\"text\": \"...\", \"label\": ...}.")
        yield number, row["text"], row.get("label")


def _csv_rows(text: str, label: str) -> Iterator[tuple[int, str, object]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "text" not in columns:
        raise ExplorerError(f"'{label}' has no 'text' column (line 1 has: {', '.join(columns) or 'nothing'}); "
                            "name the column of examples 'text' and an optional one 'label'.")
    reader.fieldnames = columns
    for row in reader:
        value = row.get("label")
        value = value.strip() if isinstance(value, str) else None
        if value is not None and re.fullmatch(r"-?\d+", value):
            value = int(value)
        yield reader.line_num, row.get("text") or "", value if value != "" else None


def read_text_file(path: str | Path | bytes, *, name: str | None = None
                   ) -> tuple[list[str], list[int] | None, tuple[str, ...]]:
    """Examples (and labels, if every example has one) from a ``.txt``, ``.jsonl`` or ``.csv`` file.

    Returns ``(texts, labels, label_names)``; labels is None and label_names empty when the file
    has no labels. ``path`` may be the file's bytes (an upload), with ``name`` giving its file name.
    Blank examples are skipped; a file mixing labelled and unlabelled examples is refused.
    """
    if isinstance(path, (bytes, bytearray)):
        raw, label = bytes(path), name or "uploaded file"
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ExplorerError(f"Text file '{path}' does not exist. Check the path.")
        raw, label = file.read_bytes(), name or file.name
    suffix = Path(label).suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise ExplorerError(f"'{label}': text files must end in {', '.join(TEXT_SUFFIXES)} "
                            "(.txt one example a line, .jsonl with text and label, .csv with a text column).")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExplorerError(f"'{label}' is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from exc
    if suffix == ".txt":
        rows = [(n, line, None) for n, line in enumerate(text.splitlines(), 1)]
    elif suffix == ".jsonl":
        rows = list(_jsonl_rows(text.splitlines(), label))
    else:
        rows = list(_csv_rows(text, label))
    rows = [(n, " ".join(t.split()), y) for n, t, y in rows if t.strip()]
    if not rows:
        raise ExplorerError(f"'{label}' has no examples; put one text per line (or row).")
    has_label = [y is not None for _, _, y in rows]
    if any(has_label) and not all(has_label):
        number = next(n for (n, _, _), flag in zip(rows, has_label) if flag != has_label[0])
        raise ExplorerError(f"'{label}' mixes labelled and unlabelled examples (line {number} differs from "
                            "the first); give every example a label or none.")
    texts = [t for _, t, _ in rows]
    if not has_label[0]:
        return texts, None, ()
    labels, names = _label_ids([y for _, _, y in rows], label)
    return texts, labels, names


# --------------------------------------------------------------------------- datasets
def encode(tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, int]:
    """Token ids (N, seq_len), truncated and right-padded with the tokenizer's pad id; and that id."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ExplorerError("The tokenizer has neither a pad nor an end-of-text token; set tokenizer.pad_token.")
    if seq_len < 2:
        raise ExplorerError(f"Sequence length must be at least 2 tokens; got {seq_len}.")
    ids = tokenizer(list(texts), truncation=True, max_length=seq_len)["input_ids"]
    tokens = np.full((len(ids), seq_len), pad_id, dtype=np.int64)
    for row, sequence in enumerate(ids):
        tokens[row, :len(sequence)] = sequence
    return torch.from_numpy(tokens), int(pad_id)


def text_dataset(tokenizer, *, path: str | Path | bytes | None = None, seq_len: int = 64, seed: int = 0,
                 name: str | None = None) -> Dataset:
    """Tokenised text as a `Dataset`: the built-in corpus (``path=None``, unlabelled) or a user file.

    ``x_*`` are LongTensors (N, seq_len) of token ids; ``y_*`` the labels, or -1 everywhere when the
    text is unlabelled (then ``num_classes`` is 0). ``info`` records ``pad_id`` (models and metrics
    rebuild the attention mask from it), ``labelled``, ``source`` and ``examples``.
    """
    if path is None:
        texts, labels, label_names = list(corpus()), None, ()
        source, dataset_name = "builtin", name or "text"
        origin = (f"sentences from Python {sys.version_info.major}.{sys.version_info.minor} "
                  "standard-library docstrings")
    else:
        upload = isinstance(path, (bytes, bytearray))
        texts, labels, label_names = read_text_file(path, name=name if upload else None)
        source = name or "uploaded file" if upload else str(path)
        dataset_name = name or Path(str(path)).name
        origin = f"examples from {dataset_name}"
    if len(texts) < MIN_EXAMPLES:
        raise ExplorerError(f"'{dataset_name}' has only {len(texts)} examples; at least {MIN_EXAMPLES} are "
                            "needed to split it into train, validation and test.")
    x, pad_id = encode(tokenizer, texts, int(seq_len))
    y = torch.tensor(labels if labels is not None else [-1] * len(texts), dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(texts)))  # as data._split does
    x, y = x[order], y[order]
    n_train, n_val = int(round(0.8 * len(y))), int(round(0.1 * len(y)))
    classes = f"{len(label_names)} classes" if labels is not None else "unlabelled"
    return Dataset(
        name=dataset_name, input_shape=(int(seq_len),), num_classes=len(label_names), class_names=label_names,
        x_train=x[:n_train], y_train=y[:n_train],
        x_val=x[n_train:n_train + n_val], y_val=y[n_train:n_train + n_val],
        x_test=x[n_train + n_val:], y_test=y[n_train + n_val:],
        description=f"Text: {len(texts):,} {origin}, {classes}, {seq_len} tokens each.",
        info={"kind": "text", "pad_id": pad_id, "labelled": labels is not None, "source": source,
              "examples": len(texts), "seq_len": int(seq_len), "tokenizer": tokenizer,
              "train_texts": tuple(texts[int(i)] for i in order[:n_train])},
    )


CALIB_MODES = {
    "lines": "one example a line, truncated to the sequence length; padding is left out of the statistics",
    "windows": "windows of the sequence length cut at random from the training text's concatenated token "
               "stream, as the Wanda and SparseGPT papers calibrate (no padding)",
}
CALIB_TOKENS_PER_BATCH = 4096  # a batch of long windows stays a few hundred MB of activations on a 1 B model


def calibration(dataset: Dataset, samples: int, seq_len: int, mode: str = "lines", *, seed: int = 0) -> list:
    """``samples`` calibration sequences of up to ``seq_len`` tokens from a text dataset's training split.

    ``mode="windows"`` concatenates the training examples' tokens (untruncated) into one stream and
    cuts ``samples`` windows of exactly ``seq_len`` tokens at seeded random starts (the papers' 128 x
    2,048 from C4 / WikiText); ``mode="lines"`` takes ``samples`` examples at random, each truncated to
    ``seq_len`` and right-padded with the pad id (padding is then left out of the statistics, see
    `explorer.llm.real_rows`). Returned as ``[(ids, None), ...]`` batches of at most
    `CALIB_TOKENS_PER_BATCH` tokens.
    """
    if mode not in CALIB_MODES:
        raise ExplorerError(f"Calibration mode '{mode}' is not one of {', '.join(CALIB_MODES)}.")
    tokenizer, texts = dataset.info.get("tokenizer"), dataset.info.get("train_texts")
    if tokenizer is None or not texts:
        raise ExplorerError(f"'{dataset.name}' is not tokenised text: calibration samples, sequence length and "
                            "mode need a transformer with --data text.")
    if seq_len < 2 or samples < 1:
        raise ExplorerError(f"Calibration needs at least 1 sample of at least 2 tokens; got {samples} x {seq_len}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [row for row in tokenizer(list(texts), add_special_tokens=mode == "lines")["input_ids"] if row]
    rng = np.random.default_rng(seed)
    pad_id = dataset.info["pad_id"]
    if mode == "windows":
        stream = np.fromiter((token for row in ids for token in row), dtype=np.int64)
        if len(stream) < seq_len:
            raise ExplorerError(f"The training text holds {len(stream):,} tokens, fewer than one window of "
                                f"{seq_len:,}; lower the sequence length or calibrate on lines.")
        starts = rng.integers(0, len(stream) - seq_len + 1, size=samples)
        rows = torch.from_numpy(np.stack([stream[start:start + seq_len] for start in starts]))
    else:
        picked = rng.choice(len(ids), size=samples, replace=samples > len(ids))
        rows = torch.full((samples, seq_len), pad_id, dtype=torch.long)
        for row, index in enumerate(picked):
            tokens = ids[int(index)][:seq_len]
            rows[row, :len(tokens)] = torch.tensor(tokens)
    per_batch = max(1, CALIB_TOKENS_PER_BATCH // seq_len)
    return [(rows[start:start + per_batch], None) for start in range(0, samples, per_batch)]
