"""Set-up (issue 21, item 5): the app's runtime needs apart from the test / notebook / Ray extras, and a static
folder in the repository so Streamlit starts without its 'no static folder found' warning."""
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"pytest", "pytest-cov", "coverage", "selenium", "nbclient", "nbformat", "ipykernel", "ipywidgets", "ray"}


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {re.split(r"[=<>!~ ]", line, maxsplit=1)[0].lower(): line for line in lines if line and line[0] != "-"}


def test_the_runtime_file_leaves_the_extras_to_the_dev_file_which_includes_it():
    runtime, dev = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-dev.txt")
    assert {"torch", "streamlit", "plotly", "torch-pruning", "captum", "transformers"} <= set(runtime)
    assert not EXTRAS & set(runtime), EXTRAS & set(runtime)
    assert EXTRAS <= set(dev) and not set(runtime) & set(dev)  # each pin in one place
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert runtime["torch"] == "torch==2.13.0"


def test_the_readme_and_ci_install_the_dev_file_and_the_readme_names_python_and_a_venv():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements-dev.txt" in readme and "-m venv .venv" in readme
    assert re.search(r"Python 3\.\d+", readme)
    assert "pip install -r requirements-dev.txt" in (ROOT / ".ci" / "run").read_text()


def test_the_static_folder_streamlit_serves_is_in_the_repository():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["enableStaticServing"] is True
    tracked = subprocess.run(["git", "ls-files", "static"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked, "static/ is not tracked: a fresh clone starts with Streamlit's 'no static folder found' warning"
