"""A corpus of bad and hostile inputs (issue 23): each is one ``error:`` line and exit 2, or it works.

Cases are grouped by class (`CLASSES`); a new input of a known class belongs in its class's list,
so it cannot regress unnoticed. Every case runs `explorer.cli.main` in-process (stdin and the
process exit matter only for the hf: prompt, tried in a subprocess in tests/test_hostile_files.py),
and every case also checks that no planted payload ran (the marker file stays absent).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from explorer.cli import main
from tests import hostile

BASE = {"model": {"source": "mlp", "data": "digits", "baseline": False}, "measure": {"latency": False}}


class Files:
    """What a case builds its input from: a temporary folder on sys.path, the marker, a tiny hf folder."""

    def __init__(self, tmp: Path, hf_base: Path):
        self.tmp, self.marker, self._hf_base = tmp, tmp / "marker", hf_base

    def write(self, name: str, text: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return str(path)

    def recipe(self, text_or_changes, name: str = "run.yaml") -> list[str]:
        """``run --recipe`` of raw YAML text, or of BASE with sections replaced."""
        if not isinstance(text_or_changes, str):
            text_or_changes = json.dumps({**BASE, **text_or_changes})
        return ["run", "--recipe", self.write(name, text_or_changes)]

    def grid(self, text: str) -> list[str]:
        return ["sweep", "--grid", self.write("grid.yaml", text), "--workers", "1", "--json"]

    def data(self, name: str, x, y) -> str:
        path = self.tmp / name
        if name.endswith(".npz"):
            np.savez(path, x=x, y=y)
        else:
            torch.save({"x": x, "y": y}, path)
        return str(path)

    def module(self, name: str, source: str) -> str:
        (self.tmp / f"{name}.py").write_text(source)
        return name

    def hf(self) -> Path:
        return Path(shutil.copytree(self._hf_base, self.tmp / "hf"))


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    argv: Callable[[Files], list[str]]
    needle: str = ""        # in the error line ("" for a case that works)
    code: int | None = 2    # None: the exit code is not the point (a sweep goes on past a failed point)
    warnings: int = 0       # 'warning:' lines allowed before the error


def on_hf(folder) -> list[str]:
    return ["inspect", "--model", f"hf:{folder}"]


def prune_on(path: str) -> list[str]:
    return ["prune", "--model", "mlp", "--data", "tensors", "--data-file", path, "--sparsity", "0.5", "--plan-only"]


X, Y = np.random.default_rng(0).normal(size=(60, 1, 8, 8)).astype("float32"), np.arange(60) % 10
LAUGHS = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
          + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))

CASES: list[Case] = [
    # -- numbers in a recipe: bounds, with the limit in the message ---------------------------------
    Case("recipe-number", "budget-epochs-1e9", lambda f: f.recipe({"budget": {"epochs": 10**9}}),
         "budget.epochs must be a whole number from 1 to 1,000"),
    Case("recipe-number", "budget-epochs-1e9-text", lambda f: f.recipe("model: mlp\nbudget: {epochs: 1e9}\n"),
         "budget.epochs must be a whole number"),
    Case("recipe-number", "budget-epochs-zero", lambda f: f.recipe({"budget": {"epochs": 0}}), "budget.epochs"),
    Case("recipe-number", "finetune-epochs", lambda f: f.recipe({"finetune": {"epochs": 10**9}}),
         "'epochs' must be a whole number from 0 to 1,000"),
    Case("recipe-number", "finetune-batch", lambda f: f.recipe({"finetune": {"batch_size": 10**9}}),
         "'batch_size' must be a whole number from 1 to 65,536"),
    Case("recipe-number", "finetune-seed", lambda f: f.recipe({"finetune": {"seed": -3}}), "'seed'"),
    Case("recipe-number", "train-epochs", lambda f: f.recipe({"model": {**BASE["model"], "train_epochs": 10**6}}),
         "model.train_epochs must be a whole number from 0 to 1,000"),
    Case("recipe-number", "measure-batch", lambda f: f.recipe({"measure": {"batch": 10**9}}),
         "measure.batch must be a whole number from 1 to 65,536"),
    Case("recipe-number", "measure-threads", lambda f: f.recipe({"measure": {"threads": 10**7}}),
         "measure.threads must be a whole number from 1 to 1,024"),
    Case("recipe-number", "min-run-time-huge", lambda f: f.recipe({"measure": {"min_run_time": 1e12}}),
         "min_run_time must be a number of seconds"),
    Case("recipe-number", "min-run-time-nan", lambda f: f.recipe("model: mlp\nmeasure: {min_run_time: .nan}\n"),
         "min_run_time"),
    Case("recipe-number", "calib-batches", lambda f: f.recipe({"scoring": {"calib_batches": 10**9}}),
         "scoring.calib_batches must be a whole number from 1 to 10,000"),
    Case("recipe-number", "calib-batch-size", lambda f: f.recipe({"scoring": {"calib_batch_size": 10**9}}),
         "scoring.calib_batch_size"),
    Case("recipe-number", "seed-2e21", lambda f: f.recipe({"seed": 2 * 10**21}),
         "seed must be a whole number from 0 to 4,294,967,295"),
    Case("recipe-number", "seed-2e21-text", lambda f: f.recipe("model: mlp\nseed: 2e21\n"), "seed must be"),
    Case("recipe-number", "seed-negative", lambda f: f.recipe({"seed": -1}), "seed must be"),
    Case("recipe-number", "seed-fraction", lambda f: f.recipe({"seed": 1.5}), "seed must be"),
    Case("recipe-number", "sparsity-1e9", lambda f: f.recipe({"plan": {"sparsity": 1e9}}),
         "plan.sparsity must be a number in [0, 1]"),
    Case("recipe-number", "rounds-beyond-budget",
         lambda f: f.recipe({"method": {"name": "iterative", "rounds": 10**9}, "budget": {"epochs": 2}}), "rounds"),
    # -- devices ---------------------------------------------------------------------------------------
    Case("device", "measure-nonsense", lambda f: f.recipe({"measure": {"device": "nonsense"}}),
         "measure.device 'nonsense' is not a device"),
    Case("device", "measure-meta", lambda f: f.recipe({"measure": {"device": "meta"}}), "is not a device"),
    Case("device", "measure-bad-index", lambda f: f.recipe({"measure": {"device": "cuda:x"}}), "is not a device"),
    Case("device", "measure-number", lambda f: f.recipe({"measure": {"device": 5}}), "measure.device must be text"),
    Case("device", "finetune-nonsense", lambda f: f.recipe({"finetune": {"device": "gpu please"}}), "'device'"),
    *([Case("device", "measure-cuda-absent", lambda f: f.recipe({"measure": {"device": "cuda"}}),
            "not available here")] if not torch.cuda.is_available() else []),
    # -- numbers on the command line -------------------------------------------------------------------
    Case("flag-number", "bins-1e9", lambda f: ["inspect", "--model", "mlp", "--bins", "1000000000"],
         "argument --bins: expected a whole number from 1 to 10,000"),
    Case("flag-number", "bins-1e9-text", lambda f: ["inspect", "--model", "mlp", "--bins", "1e9"], "--bins"),
    Case("flag-number", "bins-zero", lambda f: ["inspect", "--model", "mlp", "--bins", "0"], "--bins"),
    Case("flag-number", "seed-negative", lambda f: ["inspect", "--model", "mlp", "--seed", "-1"],
         "argument --seed: expected a whole number from 0 to 4,294,967,295"),
    Case("flag-number", "seed-2e40", lambda f: ["inspect", "--model", "mlp", "--seed", str(2**40)], "--seed"),
    Case("flag-number", "seed-text", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--seed", "1e3"],
         "--seed"),
    Case("flag-number", "calib-batches", lambda f: ["inspect", "--model", "mlp", "--calib-batches", str(10**9)],
         "--calib-batches"),
    Case("flag-number", "threads", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--threads", "99999"],
         "--threads"),
    Case("flag-number", "batch", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--batch", str(10**9)],
         "--batch"),
    Case("flag-number", "batch-zero", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--batch", "0"],
         "--batch"),
    Case("flag-number", "samples-huge", lambda f: ["sensitivity", "--model", "mlp", "--samples", str(10**12)],
         "above the limit of 10,000,000"),
    Case("flag-number", "samples-zero", lambda f: ["sensitivity", "--model", "mlp", "--samples", "0"], "is empty"),
    Case("flag-number", "samples-text", lambda f: ["sensitivity", "--model", "mlp", "--samples", "ten"], "--samples"),
    Case("flag-number", "sparsity-1e9", lambda f: ["prune", "--model", "mlp", "--sparsity", "1e9"], "outside [0, 1]"),
    Case("flag-number", "min-keep", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--min-keep", "5"],
         "--min-keep"),
    Case("flag-number", "workers", lambda f: ["sweep", "--grid", "g.yaml", "--workers", str(10**9)], "--workers"),
    Case("flag-number", "seed-at-the-limit-works",
         lambda f: ["inspect", "--model", "mlp", "--seed", str(2**32 - 1), "--json"], code=0),
    # -- YAML: aliases, nesting, size, shape -----------------------------------------------------------
    Case("yaml", "billion-laughs-recipe", lambda f: f.recipe(LAUGHS + "model: mlp\n"), "uses a YAML alias"),
    Case("yaml", "billion-laughs-grid", lambda f: f.grid(LAUGHS + "model: mlp\ngrid: {seed: [0]}\n"),
         "uses a YAML alias"),
    Case("yaml", "one-alias", lambda f: f.recipe("x: &m mlp\nmodel: *m\n"), "line 2 uses a YAML alias"),
    Case("yaml", "merge-key", lambda f: f.recipe("base: &b {source: mlp}\nmodel: {<<: *b}\n"), "YAML alias"),
    Case("yaml", "nested-mappings", lambda f: f.recipe("model: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n"),
         "nests deeper than 32 levels"),
    Case("yaml", "nested-lists", lambda f: f.recipe("model: " + "[" * 10_000 + "]" * 10_000 + "\n"), "nests deeper"),
    Case("yaml", "nested-json", lambda f: f.recipe('{"model": ' + "[" * 10_000 + "]" * 10_000 + "}", "r.json"),
         "nests deeper"),
    Case("yaml", "nested-block", lambda f: f.recipe("model:\n" + "".join(" " * i + "a:\n" for i in range(1, 200))),
         "nests deeper"),
    Case("yaml", "nested-grid", lambda f: f.grid("model: mlp\ngrid: {seed: " + "[" * 5000 + "]" * 5000 + "}\n"),
         "nests deeper"),
    Case("yaml", "oversized", lambda f: f.recipe("model: mlp\n" + "#" * 2_000_000 + "\n"), "more than 1,000,000"),
    Case("yaml", "many-values", lambda f: f.recipe("model: mlp\nx: [" + "1," * 200_000 + "1]\n"),
         "more than 100,000 values"),
    Case("yaml", "a-folder", lambda f: ["run", "--recipe", str(f.tmp)], "is a folder"),
    Case("yaml", "missing", lambda f: ["run", "--recipe", str(f.tmp / "nope.yaml")], "does not exist"),
    Case("yaml", "a-list", lambda f: f.recipe("- model\n- mlp\n"), "expected a mapping"),
    Case("yaml", "empty", lambda f: f.recipe(""), "expected a mapping"),
    Case("yaml", "binary", lambda f: ["run", "--recipe", f.write("r.yaml", b"\xff\xfe\x00garbage\x80")],
         "is not valid YAML"),
    Case("yaml", "syntax", lambda f: f.recipe("model: {source: mlp\n"), "is not valid YAML"),
    Case("yaml", "python-tag", lambda f: f.recipe("model: !!python/object/apply:os.system ['true']\n"),
         "is not valid YAML"),
    Case("yaml", "unknown-section", lambda f: f.recipe({"trust": True}), "unknown setting(s) trust"),
    Case("yaml", "flat-trust", lambda f: f.recipe("model: mlp\ntrust_pickle: true\n"), "unknown setting(s)"),
    Case("yaml", "model-missing", lambda f: f.recipe("seed: 0\n"), "'model' is required"),
    Case("yaml", "anchor-without-alias-works", lambda f: f.recipe("model: &m {source: mlp, baseline: false}\n"
                                                                  "measure: {latency: false}\n"), code=0),
    # -- a recipe or run file cannot allow pickles -------------------------------------------------------
    Case("trust", "run-yaml-trusts-pickle", lambda f: ["run", "--recipe", str(hostile.run_zip_folder(
        f.tmp / "run", f.marker))], "pickled model", warnings=1),
    Case("trust", "run-yaml-trust-as-text", lambda f: ["run", "--recipe", str(hostile.run_zip_folder(
        f.tmp / "run", f.marker, trust="yes"))], "pickled model", warnings=1),
    Case("trust", "run-yaml-trust-false", lambda f: ["run", "--recipe", str(hostile.run_zip_folder(
        f.tmp / "run", f.marker, trust=False))], "--trust-pickle"),
    Case("trust", "grid-point-trusts-pickle", lambda f: f.grid(
        f"model: {{source: {hostile.pickled_model(f.tmp / 'm.pt', f.marker)}, data: digits}}\n"
        "measure: {latency: false}\ngrid: {model.trust_pickle: [true]}\n"), code=None, warnings=1),
    # -- files to write ---------------------------------------------------------------------------------
    Case("save", "prune-save-folder", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--save", str(f.tmp)],
         "--save"),
    Case("save", "run-save-folder", lambda f: f.recipe({}) + ["--save", str(f.tmp)], "is a folder"),
    Case("save", "save-under-a-file", lambda f: ["prune", "--model", "mlp", "--sparsity", "0.5", "--save",
                                                 f.write("file", "x") + "/model.pt"], "is a file, not a folder"),
    Case("save", "suggest-recipe-folder", lambda f: ["suggest", "--model", "mlp", "--target-sparsity", "0.5",
                                                     "--save-recipe", str(f.tmp)], "--save-recipe"),
    # -- data files -------------------------------------------------------------------------------------
    Case("data-file", "bfloat16-works", lambda f: prune_on(f.data("d.pt", torch.tensor(X).bfloat16(),
                                                                  torch.tensor(Y))), code=0),
    Case("data-file", "float16-works", lambda f: prune_on(f.data("d.pt", torch.tensor(X).half(), torch.tensor(Y))),
         code=0),
    Case("data-file", "bool-works", lambda f: prune_on(f.data("d.npz", X > 0, Y)), code=0),
    Case("data-file", "string-x", lambda f: prune_on(f.data("d.npz", np.full((60, 4), "a"), Y)), "x holds"),
    Case("data-file", "string-y", lambda f: prune_on(f.data("d.npz", X, np.array(["cat"] * 60))), "y holds"),
    Case("data-file", "text-as-x", lambda f: prune_on(f.data("d.pt", "hello", torch.tensor(Y))), "x holds"),
    Case("data-file", "complex-x", lambda f: prune_on(f.data("d.pt", torch.zeros(60, 4, dtype=torch.complex64),
                                                             torch.tensor(Y))), "complex64"),
    Case("data-file", "object-array", lambda f: prune_on(f.data("d.npz", np.array([None] * 60, dtype=object), Y)),
         "Cannot read"),
    Case("data-file", "labels-1e9", lambda f: prune_on(f.data("d.npz", X, np.full(60, 10**9))),
         "labels go up to 1,000,000,000"),
    Case("data-file", "labels-1e9-float", lambda f: prune_on(f.data("d.npz", X, np.full(60, 1e9))),
         "labels go up to"),
    Case("data-file", "labels-negative", lambda f: prune_on(f.data("d.npz", X, -Y)), "labels must be >= 0"),
    Case("data-file", "labels-fractional", lambda f: prune_on(f.data("d.npz", X, Y + 0.5)), "must be integers"),
    Case("data-file", "labels-beyond-the-model", lambda f: [
        "prune", "--model", str(hostile.saved_with_arch(f.tmp / "mlp10.pt", "mlp")), "--data", "tensors",
        "--data-file", f.data("d.npz", X, np.arange(60) % 20), "--sparsity", "0.5"], "outputs 10 classes"),
    Case("data-file", "nan", lambda f: prune_on(f.data("d.npz", np.where(X > 1, np.nan, X), Y)), "NaN"),
    Case("data-file", "lengths-differ", lambda f: prune_on(f.data("d.npz", X, Y[:30])), "x must be (N"),
    Case("data-file", "too-few", lambda f: prune_on(f.data("d.npz", X[:5], Y[:5])), "only 5 samples"),
    Case("data-file", "a-list", lambda f: prune_on(f.write("d.pt", _saved([1, 2, 3]))), "must hold a dict"),
    Case("data-file", "missing", lambda f: prune_on(str(f.tmp / "nope.npz")), "does not exist"),
    # -- factories the user names -------------------------------------------------------------------------
    Case("factory", "sys-exit-0", lambda f: ["inspect", "--model", f.module(
        "exits_zero", "import sys\ndef make():\n    sys.exit(0)\n") + ":make"], "called sys.exit(0)"),
    Case("factory", "sys-exit-at-import", lambda f: ["inspect", "--model", f.module(
        "exits_import", "import sys\nsys.exit(3)\n") + ":make"], "called sys.exit(3)"),
    Case("factory", "exit-builtin", lambda f: ["inspect", "--model", f.module(
        "exits_builtin", "def make():\n    exit()\n") + ":make"], "called sys.exit(None)"),
    Case("factory", "raises", lambda f: ["inspect", "--model", f.module(
        "raises_value", "def make():\n    raise ValueError('no')\n") + ":make"], "raised ValueError"),
    Case("factory", "returns-int", lambda f: ["inspect", "--model", f.module(
        "returns_int", "def make():\n    return 42\n") + ":make"], "returned int"),
    Case("factory", "not-callable", lambda f: ["inspect", "--model", f.module(
        "constant_only", "MODEL = 3\n") + ":MODEL"], "is not callable"),
    Case("factory", "no-attribute", lambda f: ["inspect", "--model", f.module("empty_mod", "") + ":make"],
         "has no attribute"),
    Case("factory", "no-module", lambda f: ["inspect", "--model", "no_such_module_here:make"], "Cannot import"),
    Case("factory", "import-error", lambda f: ["inspect", "--model", f.module(
        "broken_import", "import no_such_dependency\n") + ":make"], "Cannot import"),
    # -- an architecture named inside a file ----------------------------------------------------------------
    # -- deploy: a model file is data; the pruned copy to deploy never runs code it names ---------------------
    Case("deploy", "pickled-payload", lambda f: ["deploy", "--model", str(hostile.pickled_model(f.tmp / "m.pt", f.marker))],
         "not saved by Pruning Explorer"),
    Case("deploy", "arch-names-a-payload", lambda f: ["deploy", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", hostile.factory_module(f.tmp, "deploy_payload", f.marker)))], "a file never chooses code"),
    Case("deploy", "unknown-runtime", lambda f: ["deploy", "--model", "run:1", "--runtimes", "eager,tensorrt"],
         "Unknown runtime 'tensorrt'"),
    Case("deploy", "export-into-a-file", lambda f: ["deploy", "--model", "run:1", "--export", f.write("x.txt", "x")],
         "is a file; give a folder"),
    Case("file-arch", "payload-module", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", hostile.factory_module(f.tmp, "corpus_payload", f.marker)))],
         "names its architecture as 'corpus_payload:make'"),
    Case("file-arch", "tempfile-mkdtemp", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", "tempfile:mkdtemp"))], "never chooses code to run"),
    Case("file-arch", "os-system", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", "os:system"))], "--arch os:system"),
    Case("file-arch", "dotted-no-colon", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", "subprocess.Popen"))], "not a zoo model"),
    Case("file-arch", "empty", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(f.tmp / "w.pt", ""))],
         "names no architecture"),
    Case("file-arch", "a-list", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", ["os:system"]))], "names no architecture"),
    Case("file-arch", "payload-through-weights", lambda f: ["inspect", "--model", "lenet5", "--weights", str(
        hostile.saved_with_arch(f.tmp / "w.pt", hostile.factory_module(f.tmp, "corpus_weights", f.marker)))],
         "that this architecture lacks"),
    Case("file-arch", "hf-folder-that-is-not-there", lambda f: ["inspect", "--model", str(hostile.saved_with_arch(
        f.tmp / "w.pt", "hf:/no/such/folder"))], "does not exist"),
    Case("file-arch", "user-zoo-choice-works", lambda f: ["inspect", "--model", "mlp", "--json", "--weights", str(
        hostile.saved_with_arch(f.tmp / "w.pt", hostile.factory_module(f.tmp, "corpus_zoo", f.marker)))], code=0),
    # -- Hugging Face folders -----------------------------------------------------------------------------
    Case("hf-folder", "auto-map-config", lambda f: on_hf(hostile.hf_custom_code(f.hf(), f.marker)),
         "asks to run its own Python code (config.json has auto_map)"),
    Case("hf-folder", "auto-map-tokenizer",
         lambda f: on_hf(hostile.hf_custom_code(f.hf(), f.marker, "tokenizer_config.json")),
         "tokenizer_config.json has auto_map"),
    Case("hf-folder", "custom-pipelines", lambda f: on_hf(_edited(f.hf(), custom_pipelines={"x": {"impl": "e.P"}})),
         "has custom_pipelines"),
    Case("hf-folder", "custom-model-type", lambda f: on_hf(_edited(f.hf(), model_type="evil")),
         "Cannot read config.json"),
    Case("hf-folder", "missing-class", lambda f: on_hf(_edited(f.hf(), architectures=["NopeForMaskedLM"])),
         "names the architecture 'NopeForMaskedLM'"),
    Case("hf-folder", "architectures-not-names", lambda f: on_hf(_edited(f.hf(), architectures=[3])),
         "'architectures' must be a list of class names"),
    Case("hf-folder", "config-not-json", lambda f: on_hf(_broken(f.hf(), "config.json")),
         "Cannot read config.json"),
    Case("hf-folder", "weights-truncated", lambda f: on_hf(_broken(f.hf(), "model.safetensors")),
         "Cannot load the weights"),
    Case("hf-folder", "no-config", lambda f: on_hf(f.tmp), "has no config.json"),
    Case("hf-folder", "a-file", lambda f: on_hf(f.write("x.txt", "x")), "is a file"),
    Case("hf-folder", "missing", lambda f: on_hf("/no/such/folder"), "does not exist"),
    Case("hf-folder", "plain-folder-works", lambda f: on_hf(f.hf()) + ["--json"], code=0),
]
CLASSES = sorted({case.kind for case in CASES})


def _saved(value) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _edited(folder: Path, **changes) -> Path:
    hostile.edit_json(folder / "config.json", **changes)
    return folder


def _broken(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
    return folder


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return hostile.hf_folder(tmp_path_factory.mktemp("hf_base") / "tiny")


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's refusals end the parse with exit 2
        return exc.code


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.kind}:{case.name}")
def test_bad_input_is_one_line_or_works(case, tmp_path, hf_base, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    files = Files(tmp_path, hf_base)
    code = run_main(case.argv(files))
    err = capsys.readouterr().err
    assert not files.marker.exists(), "a planted payload ran"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("sweep ")]  # a sweep's progress lines
    if case.code is not None:
        assert code == case.code, err
    if case.code == 2:
        assert len(lines) == 1 + case.warnings, err
        assert lines[-1].startswith("error: ") and case.needle in lines[-1], err
        assert all(line.startswith("warning: ") for line in lines[:-1]), err
    else:
        assert len([line for line in lines if line.startswith("warning: ")]) == case.warnings, err


def test_the_corpus_covers_every_class_with_several_cases():
    counts = {kind: sum(case.kind == kind for case in CASES) for kind in CLASSES}
    assert set(counts) >= {"recipe-number", "device", "flag-number", "yaml", "trust", "save", "data-file", "factory",
                           "file-arch", "hf-folder"}
    assert min(counts.values()) >= 4, counts
    assert len({(case.kind, case.name) for case in CASES}) == len(CASES)  # ids are unique


# --------------------------------------------------------------------------- the same classes on the Model page
def _start_app():
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file("../app.py", default_timeout=240).run()
    assert not at.exception, at.exception
    return at


def _one_error(at) -> str:
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    assert "\n" not in at.error[0].value
    assert at.session_state["current_model"]["label"] == "mlp"  # the previous model stays
    return at.error[0].value


def test_app_factory_that_exits_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "exits_app.py").write_text("import sys\n\ndef make(input_shape=None, num_classes=None):\n"
                                           "    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    at = _start_app()
    at.radio(key="model_source").set_value("Python factory").run()
    at.text_input(key="factory_spec").set_value("exits_app:make").run()
    at.button(key="factory_load").click().run()
    assert "called sys.exit(0)" in _one_error(at)


@pytest.mark.parametrize("name, x, y, needle", [
    ("labels.npz", X, np.full(60, 10**9), "labels go up to 1,000,000,000"),
    ("text.npz", np.full((60, 4), "a"), Y, "x holds"),
    ("complex.pt", torch.zeros(60, 4, dtype=torch.complex64), torch.tensor(Y), "complex64"),
])
def test_app_bad_data_file_is_one_error(tmp_path, name, x, y, needle):
    path = Files(tmp_path, tmp_path).data(name, x, y)
    at = _start_app()
    at.selectbox(key="zoo_dataset").set_value("tensors").run()
    at.file_uploader(key="zoo_data").set_value((name, Path(path).read_bytes(), "application/octet-stream")).run()
    assert needle in _one_error(at)
