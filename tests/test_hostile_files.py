"""Hostile files never run code (issue 23): three doors, each tried in the CLI and in the app.

1. an ``hf:`` folder whose config asks for its own code (``auto_map``), with "y" waiting on stdin;
2. a downloaded run whose ``run.yaml`` was edited to trust pickles, next to a pickled payload;
3. a weights-only file whose metadata names its architecture as an import path.

Each test plants a payload that writes a marker file and asserts the marker never appears; the
user's own opt-in (``--trust-pickle``, ``--arch``, the app's factory field) is the positive control.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
from streamlit.testing.v1 import AppTest

from explorer.cli import main
from explorer.errors import ExplorerError, ExplorerWarning
from explorer.recipe import Recipe
from tests import hostile
from tests.apptest import texts


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def start() -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=240).run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return hostile.hf_folder(tmp_path_factory.mktemp("hf") / "tiny")


# --------------------------------------------------------------------------- 1. hf: folders with their own code
@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_cli_never_runs_an_hf_folders_code_even_with_y_on_stdin(tmp_path, hf_base, where):
    import shutil
    folder = hostile.hf_custom_code(shutil.copytree(hf_base, tmp_path / "evil"), tmp_path / "marker", where)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "explorer", "inspect", "--model", f"hf:{folder}"],
                          input="y\ny\ny\n", capture_output=True, text=True, timeout=120, env=env)
    assert not (tmp_path / "marker").exists(), "the folder's code ran"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "asks to run its own Python code" in proc.stderr and where in proc.stderr


def test_every_transformers_load_passes_trust_remote_code_false():
    """A second lock behind the auto_map check: no from_pretrained in explorer/ may leave it to transformers."""
    import re
    from pathlib import Path
    calls = 0
    for path in Path("explorer").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"\.from_pretrained\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # to the call's own closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            assert "trust_remote_code=False" in text[match.start():end], f"{path}: {text[match.start():end]}"
            calls += 1
    assert calls >= 3  # config, tokenizer, model in explorer/hf.py


def test_app_never_runs_an_hf_folders_code(tmp_path, hf_base):
    import shutil
    from app_pages.common import TRANSFORMER_FOLDER
    folder = hostile.hf_custom_code(shutil.copytree(hf_base, tmp_path / "evil"), tmp_path / "marker")
    at = start()
    at.radio(key="model_source").set_value("Transformer").run()
    at.selectbox(key="tf_model").set_value(TRANSFORMER_FOLDER).run()
    at.text_input(key="tf_folder").set_value(str(folder)).run()
    at.button(key="tf_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not (tmp_path / "marker").exists(), "the folder's code ran"
    assert "asks to run its own Python code" in texts(at.error)
    assert at.session_state["current_model"]["label"] == "mlp"  # the previous model stays


# --------------------------------------------------------------------------- 2. a run file cannot trust pickles
def test_a_run_yaml_cannot_turn_on_pickle_loading(capsys, tmp_path):
    marker = tmp_path / "marker"
    recipe = hostile.run_zip_folder(tmp_path / "run", marker)
    code, _, err = cli(capsys, "run", "--recipe", str(recipe))
    assert not marker.exists(), "the pickled payload ran"
    assert code == 2 and "Traceback" not in err
    warning, error = err.splitlines()
    assert warning.startswith("warning: the recipe's model.trust_pickle is ignored") and "--trust-pickle" in warning
    assert error.startswith("error: ") and "pickled model" in error and "--trust-pickle" in error

    code, _, err = cli(capsys, "run", "--recipe", str(recipe), "--trust-pickle")  # the user's flag: the control
    assert marker.exists() and code == 0, err


@pytest.mark.parametrize("field", ["source", "arch"])
def test_a_run_folder_with_its_own_factory_module_runs_nothing_without_trust_factory(tmp_path, field):
    """``python -m`` puts the working folder on the import path: an ``evil.py`` beside the ``run.yaml``
    that names ``evil:make`` would be imported by a plain replay."""
    marker = tmp_path / "marker"
    folder = tmp_path / "run"
    folder.mkdir()
    factory = hostile.factory_module(folder, "evil", marker)
    model = {"source": factory, "data": "digits"} if field == "source" else {
        "source": str(hostile.saved_with_arch(folder / "model.pt", "mlp")), "arch": factory, "data": "digits"}
    (folder / "run.yaml").write_text(json.dumps({"model": model, "plan": {"sparsity": 0.5},
                                                 "measure": {"latency": False}}))
    argv = [sys.executable, "-m", "explorer", "run", "--recipe", "run.yaml"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the recipe's factory was imported"
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"error: The recipe names the Python factory '{factory}': importing it runs "
                                        "its code. If you trust it, pass --trust-factory; a recipe cannot allow it "
                                        "by itself."]
    done = subprocess.run(argv + ["--trust-factory"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert marker.exists() and done.returncode == 0, done.stderr  # the user's flag: the control


@pytest.mark.parametrize("asked", [True, "yes", 1, "true"])
def test_recipe_from_dict_never_keeps_trust_pickle(asked):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = Recipe.from_dict({"model": {"source": "mlp", "trust_pickle": asked}})
    assert recipe.model.trust_pickle is False
    assert [w.category for w in caught] == [ExplorerWarning]
    assert recipe.replace(model={"trust_pickle": True}).model.trust_pickle is True  # code (a flag) still can


def test_app_upload_of_a_pickle_runs_nothing_without_the_checkbox(tmp_path):
    marker = tmp_path / "marker"
    content = hostile.pickled_model(tmp_path / "model.pt", marker).read_bytes()
    at = start()
    at.radio(key="model_source").set_value("Model file").run()
    at.file_uploader(key="model_file").set_value(("model.pt", content, "application/octet-stream")).run()
    at.button(key="file_load").click().run()
    assert not at.exception and not marker.exists()
    assert "pickled model" in texts(at.error)
    at.checkbox(key="file_trust").check().run()  # the user's own opt-in: the control
    at.button(key="file_load").click().run()
    assert marker.exists() and at.session_state["current_model"]["label"] == "model.pt", texts(at.error)


def test_a_stored_run_that_trusts_pickles_reopens_without_trust(tmp_path):
    """A link to a stored run rebuilds its Recipe with `Recipe.from_dict`: the stored trust is dropped."""
    from explorer.store import Run, RunStore
    marker = tmp_path / "marker"
    model = hostile.pickled_model(tmp_path / "model.pt", marker)
    recipe = Recipe.from_dict({"model": {"source": str(model), "data": "digits", "baseline": False}})
    stored = recipe.to_dict()
    stored["model"]["trust_pickle"] = True
    run = RunStore().save(Run(model_name=str(model), dataset="digits", structure="unstructured",
                              criterion="magnitude", scope="local", sparsity=0.5, recipe=stored))
    at = AppTest.from_file("../app.py", default_timeout=240)
    at.query_params["run"] = str(run.id)
    at.run()
    assert not at.exception and not marker.exists()


# --------------------------------------------------------------------------- 3. an architecture named by a file
@pytest.mark.parametrize("arch", ["payload_arch:make", "tempfile:mkdtemp", "os:getcwd", "builtins:print"])
def test_cli_never_imports_an_architecture_a_file_names(capsys, tmp_path, monkeypatch, arch):
    marker = tmp_path / "marker"
    hostile.factory_module(tmp_path, "payload_arch", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: marker.write_text("mkdtemp called"))
    path = hostile.saved_with_arch(tmp_path / "weights.pt", arch)
    code, _, err = cli(capsys, "inspect", "--model", str(path))
    assert not marker.exists(), "an import path from the file was called"
    assert code == 2 and err.count("\n") == 1 and f"names its architecture as '{arch}'" in err
    assert f"--arch {arch}" in err  # how the user names it, if they trust it


def test_the_user_naming_the_factory_is_the_only_way_in(capsys, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    spec = hostile.factory_module(tmp_path, "payload_arch", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = hostile.saved_with_arch(tmp_path / "weights.pt", spec)
    code, _, err = cli(capsys, "inspect", "--model", "mlp", "--weights", str(path))  # the user's zoo name wins
    assert code == 0 and not marker.exists(), err
    code, _, err = cli(capsys, "inspect", "--model", str(path), "--arch", spec)  # named by the user: runs
    assert code == 0 and marker.exists(), err


def test_app_upload_never_imports_an_architecture_the_file_names(tmp_path, monkeypatch):
    from app_pages.model import FILE_FACTORY
    marker = tmp_path / "marker"
    spec = hostile.factory_module(tmp_path, "payload_arch_app", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    content = hostile.saved_with_arch(tmp_path / "weights.pt", spec).read_bytes()
    at = start()
    at.radio(key="model_source").set_value("Model file").run()
    at.file_uploader(key="model_file").set_value(("weights.pt", content, "application/octet-stream")).run()
    at.button(key="file_load").click().run()
    assert not at.exception and not marker.exists(), "the file's import path was called"
    assert f"names its architecture as '{spec}'" in texts(at.error)
    assert at.session_state["current_model"]["label"] == "mlp"
    at.selectbox(key="file_arch").set_value(FILE_FACTORY).run()  # the user names the factory: the control
    at.text_input(key="file_factory").set_value(spec).run()
    at.button(key="file_load").click().run()
    assert marker.exists() and at.session_state["current_model"]["label"] == "weights.pt", texts(at.error)


def test_saved_arch_refuses_what_is_not_a_zoo_or_transformer_name(tmp_path):
    from explorer.models import saved_arch
    for named in ("os:system", "", None, ["mlp"], "subprocess.Popen"):
        with pytest.raises(ExplorerError):
            saved_arch(named, tmp_path / "x.pt")
    assert saved_arch("lenet5", tmp_path / "x.pt") == "lenet5"
    assert saved_arch("os:system", tmp_path / "x.pt", chosen="mlp") == "mlp"
