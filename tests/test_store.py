import io
import json
import sqlite3
import threading
import zipfile

import pytest
import torch
from streamlit.testing.v1 import AppTest

from explorer import store as store_module
from explorer.errors import ExplorerError
from explorer.models import build, load_model
from explorer.store import Run, RunStore, StoreError, keep_runs
from tests.storefaults import damage, freeze, thaw


def test_runs_survive_a_new_store_object(tmp_path):
    store = RunStore(tmp_path)
    model = build("mlp", (1, 8, 8), 10)
    run = store.save(Run("mlp", "digits", "unstructured", "magnitude", "global", 0.8,
                         settings={"input_shape": [1, 8, 8], "num_classes": 10},
                         metrics={"accuracy": 0.91}, history=[{"epoch": 1, "loss": 0.3}]), model)
    again = RunStore(tmp_path)  # as after a server restart
    stored = again.get(run.id)
    assert stored.metrics == {"accuracy": 0.91} and stored.history == [{"epoch": 1, "loss": 0.3}]
    assert stored.name.startswith(f"run {run.id}")
    loaded = load_model(again.weights_path(run.id))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert [r.id for r in again.list()] == [run.id]


def test_rename_delete_export(tmp_path):
    store = RunStore(tmp_path)
    model = build("mlp", (1, 8, 8), 10)
    run = store.save(Run("mlp", "digits", "channel", "taylor", "local", 0.5,
                         settings={"input_shape": [1, 8, 8], "num_classes": 10}), model)
    assert store.rename(run.id, "  best so far ").name == "best so far"
    with pytest.raises(ExplorerError):
        store.rename(run.id, "   ")
    archive = zipfile.ZipFile(io.BytesIO(store.export(run.id)))
    assert set(archive.namelist()) == {"run.json", "run.yaml", "model.pt"}
    assert json.loads(archive.read("run.json"))["criterion"] == "taylor"
    store.delete(run.id)
    assert store.list() == [] and not store.weights_path(run.id).exists()
    with pytest.raises(ExplorerError, match="no run"):
        store.get(run.id)


def test_a_fine_tune_run_is_named_after_itself_not_after_its_parent(tmp_path):
    store = RunStore(tmp_path)
    first = store.save(Run("mlp", "digits", "unstructured", "magnitude", "global", 0.8))
    second = store.save(Run("mlp", "digits", "unstructured", "magnitude", "global", 0.8, stage=1,
                            settings={"finetune": {"epochs_done": 1, "cancelled": True}}))
    assert first.name == "run 1: mlp unstructured magnitude global 80%"
    assert second.name == "run 2: mlp unstructured magnitude global 80% + fine-tune 1 ep (cancelled)"


def test_an_old_database_gains_the_sweep_column_and_filters_by_it(tmp_path):
    with sqlite3.connect(tmp_path / "runs.sqlite") as db:  # the first release's table, one run in it
        db.execute("""CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, created REAL NOT NULL,
                      model_name TEXT, dataset TEXT, structure TEXT, criterion TEXT, scope TEXT, sparsity REAL,
                      settings TEXT, metrics TEXT, history TEXT)""")
        db.execute("INSERT INTO runs (name, created, model_name, dataset, structure, criterion, scope, sparsity, "
                   "settings, metrics, history) VALUES ('old', 1.0, 'mlp', 'digits', 'unstructured', 'magnitude', "
                   "'local', 0.5, '{}', '{}', '[]')")
    store = RunStore(tmp_path)
    old = store.list()[0]
    assert (old.name, old.sweep, old.recipe, old.stage) == ("old", "", {}, 0)
    store.save(Run("mlp", "digits", "unstructured", "taylor", "local", 0.8, sweep="grid-1"))
    store.save(Run("mlp", "digits", "unstructured", "magnitude", "local", 0.8, sweep="grid-2"))
    assert [run.criterion for run in store.list(sweep="grid-1")] == ["taylor"]
    assert store.sweeps() == ["grid-1", "grid-2"] and len(store.list()) == 3
    assert store.new_sweep("grid").endswith(" #1")  # the old file gained the table that numbers sweeps


# --- many writers, and stores that fail (issue 23) -------------------------------------------------


def _run(**values) -> Run:
    return Run("mlp", "digits", "unstructured", "magnitude", "local", 0.5, **values)


@pytest.fixture
def frozen(tmp_path):
    """A store with one run whose file then refuses every write (see tests/storefaults.py)."""
    store = RunStore(tmp_path / "data")
    store.save(_run(name="before"))
    if not freeze(store.db_path):
        pytest.skip("cannot make a file read-only here (root without chattr)")
    yield RunStore(store.root)
    thaw(store.db_path)


def test_the_store_runs_in_wal_mode_so_a_reader_never_blocks_a_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 2.0)  # a regression fails in seconds, not 30
    store = RunStore(tmp_path)
    store.save(_run())
    reader = sqlite3.connect(store.db_path)
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM runs").fetchone()  # holds a read transaction open, as a listing page does
    try:
        assert store.save(_run()).id == 2
    finally:
        reader.close()


def test_writers_in_several_threads_all_land_with_distinct_ids(tmp_path):
    errors = []

    def write(count):
        try:
            for _ in range(count):
                RunStore(tmp_path).save(_run())  # one store object each, as separate sessions have
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(15,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(run.id for run in RunStore(tmp_path).list()) == list(range(1, 61))


def test_a_damaged_store_is_one_line_naming_the_file_and_what_to_do(tmp_path):
    damage(tmp_path / "runs.sqlite")
    store = RunStore(tmp_path)  # building one never fails; the first call says what is wrong
    for call in (store.list, store.sweeps, lambda: store.get(1), store.check_writable):
        with pytest.raises(StoreError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and str(store.db_path) in message
        assert "not a SQLite database" in message and "move it away" in message
        assert "PRUNING_EXPLORER_DATA" in message


def test_a_store_whose_folder_is_a_file_is_one_line(tmp_path):
    (tmp_path / "data").write_text("a file where the store's folder should be")
    with pytest.raises(StoreError, match=r"Cannot create the run store's folder .*PRUNING_EXPLORER_DATA"):
        RunStore(tmp_path / "data").list()


def test_a_read_only_store_still_lists_and_a_refused_run_is_kept_in_a_file(frozen):
    assert [run.name for run in frozen.list()] == ["before"]  # reading needs no write
    with pytest.raises(StoreError, match=r"read-only .*fix the permissions") as refused:
        frozen.check_writable()
    assert str(frozen.db_path) in str(refused.value)
    model = build("mlp", (1, 8, 8), 10)
    run = _run(name="after", settings={"input_shape": [1, 8, 8], "num_classes": 10}, metrics={"accuracy": 0.9})
    with pytest.raises(StoreError) as caught:
        frozen.save(run, model)
    message, kept = str(caught.value), caught.value.kept
    assert "\n" not in message and "read-only" in message and f"kept in {kept}" in message
    assert kept.parent == frozen.root / "unsaved" and run.id is None
    [entry] = json.loads(kept.read_text())
    assert Run(**entry) == run  # the whole run, ready to store again
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_model(kept.with_suffix(".pt"))(x), model(x))
    assert [r.name for r in frozen.list()] == ["before"]


def test_keeping_falls_back_to_the_temp_folder_when_the_stores_folder_refuses(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file: no 'unsaved' folder can be made inside it")
    monkeypatch.setattr(store_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = keep_runs([_run(name="orphan")], blocked, "sweep-x")
    assert path == tmp_path / "tmp" / "pruning-explorer-unsaved" / "sweep-x.json"
    assert [entry["name"] for entry in json.loads(path.read_text())] == ["orphan"]


def test_sweep_ids_are_handed_out_once_even_within_one_second(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.new_sweep("grid") for _ in range(3)]
    assert len(set(ids)) == 3 and all(i.startswith("grid (") for i in ids)
    assert [i.rsplit("#", 1)[1] for i in ids] == ["1", "2", "3"]
    assert RunStore(tmp_path).new_sweep("grid").endswith("#4")  # numbers live in the file, not the object


def test_the_compare_page_shows_a_damaged_store_as_one_error_and_keeps_running(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))
    damage(tmp_path / "runs.sqlite")
    at = AppTest.from_file("../app_pages/compare.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = at.error
    assert str(tmp_path / "runs.sqlite") in error.value and "move it away" in error.value


def test_apply_on_a_damaged_store_keeps_the_measured_run_and_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))
    damage(tmp_path / "runs.sqlite")
    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/prune.py").run()
    at.button(key="prune_apply").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = [e.value for e in at.error if "kept in" in e.value]
    assert str(tmp_path / "runs.sqlite") in error and "move it away" in error
    [kept] = (tmp_path / "unsaved").glob("run-*.json")
    assert f"kept in {kept}" in error
    [entry] = json.loads(kept.read_text())
    assert entry["metrics"]["params_nonzero"] < entry["metrics"]["params_total"]  # the measured copy, not lost
    assert load_model(kept.with_suffix(".pt")) is not None


def test_weights_the_store_cannot_write_are_kept_beside_it_and_the_run_stays(tmp_path):
    store = RunStore(tmp_path)
    assert store.list() == []
    (tmp_path / "weights").rmdir()
    (tmp_path / "weights").write_text("a file where the weights folder should be")
    model = build("mlp", (1, 8, 8), 10)
    with pytest.raises(StoreError, match=r"Run 1 is stored but its weights could not be written") as caught:
        store.save(_run(settings={"input_shape": [1, 8, 8], "num_classes": 10}), model)
    kept = caught.value.kept.with_suffix(".pt")
    assert f"kept in {kept}" in str(caught.value) and "\n" not in str(caught.value)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_model(kept)(x), model(x))
    assert [run.id for run in store.list()] == [1]


def test_a_read_only_store_of_the_release_before_sweep_numbers_still_lists(tmp_path):
    store = RunStore(tmp_path)
    store.save(_run(name="old"))
    with sqlite3.connect(store.db_path) as db:
        db.execute("DROP TABLE sweeps")
    if not freeze(store.db_path):
        pytest.skip("cannot make a file read-only here (root without chattr)")
    try:
        again = RunStore(tmp_path)
        assert [run.name for run in again.list()] == ["old"]
        with pytest.raises(StoreError, match="read-only"):
            again.new_sweep("grid")
    finally:
        thaw(store.db_path)
