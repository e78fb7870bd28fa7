"""Hostile files for the tests: each plants a payload that would write a marker file if it ever ran.

A test asserts the marker never appears; a positive control (the user's explicit opt-in) shows
the payload is live, so a marker that stays absent means the door is shut, not that the payload is broken.
"""
import json
import shutil
from pathlib import Path

import torch


def payload_source(marker: Path) -> str:
    """Python that writes ``marker`` when executed (imported, called or unpickled)."""
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('payload ran')\n"


class _PickledPayload:
    """Unpickles by evaluating code: writes the marker, then returns a working mlp so a trusted run goes on."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        code = (f"(__import__('pathlib').Path({str(self.marker)!r}).write_text('payload ran'), "
                "__import__('explorer.zoo').zoo.build('mlp', (1, 8, 8), 10))[1]")
        return eval, (code,)


def pickled_model(path: Path, marker: Path) -> Path:
    """A pickled "nn.Module" file whose unpickling runs the payload (what ``torch.save(module)`` files can do)."""
    torch.save(_PickledPayload(marker), path)
    return path


def run_zip_folder(folder: Path, marker: Path, trust: object = True) -> Path:
    """A downloaded run unpacked: ``model.pt`` (pickled payload) and a ``run.yaml`` edited to trust pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    model = pickled_model(folder / "model.pt", marker)
    recipe = {"model": {"source": str(model), "data": "digits", "baseline": False, "trust_pickle": trust},
              "plan": {"sparsity": 0.5}, "measure": {"latency": False}}
    (folder / "run.yaml").write_text(json.dumps(recipe))
    return folder / "run.yaml"


def factory_module(folder: Path, name: str, marker: Path) -> str:
    """A module ``name`` in ``folder`` whose ``make`` writes the marker and returns an mlp; returns 'name:make'."""
    (folder / f"{name}.py").write_text(
        "def make(input_shape=None, num_classes=None):\n"
        f"    {payload_source(marker)}"
        "    from explorer.zoo import build\n"
        "    return build('mlp', tuple(input_shape or (1, 8, 8)), num_classes or 10)\n")
    return f"{name}:make"


def saved_with_arch(path: Path, arch: object) -> Path:
    """A weights-only file in save_model's format whose metadata names ``arch`` (no pickled code in it)."""
    from explorer.models import build, save_model

    save_model(build("mlp", (1, 8, 8), 10), path, arch="mlp", input_shape=(1, 8, 8), num_classes=10)
    payload = torch.load(path, weights_only=True)
    payload["arch"] = arch
    torch.save(payload, path)
    return path


def hf_folder(folder: Path) -> Path:
    """A tiny, loadable Hugging Face BERT classifier folder (config, weights, tokenizer)."""
    from explorer import hf

    if folder.exists():
        shutil.rmtree(folder)
    bundle = hf.builtin("tiny_bert")
    return hf.save_hf(bundle.model, bundle.tokenizer, folder)


def hf_custom_code(folder: Path, marker: Path, where: str = "config.json") -> Path:
    """``folder`` turned into one that asks transformers to import its own .py files (``auto_map``)."""
    source = payload_source(marker)
    (folder / "configuration_evil.py").write_text(
        source + "from transformers import BertConfig\n\nclass EvilConfig(BertConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(
        source + "from transformers import BertForSequenceClassification\n\n"
                 "class EvilModel(BertForSequenceClassification):\n    pass\n")
    (folder / "tokenization_evil.py").write_text(
        source + "from transformers import BertTokenizer\n\nclass EvilTokenizer(BertTokenizer):\n    pass\n")
    if where == "config.json":
        edit_json(folder / "config.json", model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    else:
        edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    return folder


def edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
