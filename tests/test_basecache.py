"""The base model's figures are measured once per folder content and settings, and reused only then."""
import json

import pytest

from explorer import basecache, hf
from explorer.cli import main


@pytest.fixture
def folder(tmp_path):
    bundle = hf.builtin("tiny_gpt2")
    return hf.save_hf(bundle.model, bundle.tokenizer, tmp_path / "gpt2")


def _prune(capsys, folder, *extra):
    assert main(["prune", "--model", f"hf:{folder}", "--sparsity", "0.5", "--eval-tokens", "400", "--json",
                 *extra]) == 0
    result = json.loads(capsys.readouterr().out)
    return result[0] if isinstance(result, list) else result


def test_a_second_prune_of_the_same_folder_reuses_the_base_figures_and_says_so(capsys, folder, monkeypatch):
    first = _prune(capsys, folder)
    assert "base_cached" not in first
    from explorer import tasks

    calls = []
    original = tasks.evaluate_task
    monkeypatch.setattr(tasks, "evaluate_task", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    second = _prune(capsys, folder)
    assert "cache" in second["base_cached"] and len(calls) == 1  # only the pruned copy is evaluated
    assert second["task"] == first["task"] and second["flops"] == first["flops"] and second["params"] == first["params"]
    fresh = _prune(capsys, folder, "--fresh-base")
    assert "base_cached" not in fresh and fresh["task"]["base"] == first["task"]["base"] and len(calls) == 3
    other = _prune(capsys, folder, "--seed", "1")  # other settings: measured again
    assert "base_cached" not in other


def test_the_key_follows_every_file_of_the_folder_and_the_settings(folder):
    name = basecache.key(f"hf:{folder}", seed=0)
    assert name == basecache.key(f"hf:{folder}", seed=0) and name != basecache.key(f"hf:{folder}", seed=1)
    config = folder / "config.json"
    config.write_text(config.read_text().replace("{", '{"_edited": 1,', 1))
    assert basecache.key(f"hf:{folder}", seed=0) != name
    assert basecache.key("tiny_gpt2", seed=0) is None and basecache.load(None) is None
    basecache.store(None, {"task": 1.0})  # nothing to name: nothing kept
    (basecache.cache_dir() / "broken.json").write_text("{not json")
    assert basecache.load("broken") is None
