"""Sweeps (explorer/sweep.py) and their backends (explorer/backends.py): a grid of recipes, every point a run.

The numbers of a sweep are checked against `run_recipe` on each point's recipe alone (one torch
thread, as in every worker); Ray is checked against the local pool on the same grid and seeds with
one local Ray instance for the module (about 7 s to start here).
"""
import json
import math
import sys
import threading
from pathlib import Path

import pytest
import yaml
from streamlit.testing.v1 import AppTest

from explorer import backends, cli, sensitivity
from explorer.errors import ExplorerError
from explorer.recipe import Recipe, run_recipe
from explorer.specs import ScoringSpec
from explorer.store import Run, RunStore
from explorer.sweep import MAX_POINTS, expand, resolve_field, run_sweep
from tests.storefaults import damage, freeze, thaw

BASE = {"model": {"source": "mlp", "data": "digits"}, "measure": {"latency": False}}
# Deterministic numbers of a run (latency is timed, so it is off in these grids).
EXACT = ("accuracy", "base_accuracy", "sparsity_actual", "params_nonzero", "params_total", "flops_effective",
         "size_compressed_bytes")


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    """A run database per test (the baseline cache stays the session's, see conftest)."""
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path / "data"))


def grid_file(tmp_path, grid, **recipe) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**BASE, **recipe, "grid": grid}))
    return str(path)


_ALONE: dict = {}


def alone(recipe: Recipe) -> dict:
    """The metrics of running one recipe by itself, with one torch thread as every worker does."""
    key = repr(recipe.to_dict())
    if key not in _ALONE:
        with backends.torch_threads(1):
            _ALONE[key] = run_recipe(recipe)["metrics"]
    return _ALONE[key]


def assert_same_numbers(results, points):
    assert [r["index"] for r in results] == [p.index for p in points]
    for result, point in zip(results, points):
        reference = alone(point.recipe)
        assert {k: result["metrics"][k] for k in EXACT} == {k: reference[k] for k in EXACT}, point.coords


# --- grid expansion and field names ---------------------------------------------------------------


def test_the_grid_is_the_product_of_its_lists_with_coordinates_by_field_path():
    name, points = expand({**BASE, "name": "demo", "grid": {"criterion": ["magnitude", "taylor"],
                                                             "plan.sparsity": [0.5, 0.8, 0.9], "seed": [0, 1]}})
    assert name == "demo" and len(points) == 2 * 3 * 2
    assert points[0].coords == {"scoring.criterion": "magnitude", "plan.sparsity": 0.5, "seed": 0}
    assert points[-1].coords == {"scoring.criterion": "taylor", "plan.sparsity": 0.9, "seed": 1}
    assert points[1].coords["seed"] == 1 and points[2].coords["plan.sparsity"] == 0.8  # the last field varies fastest
    last = points[-1].recipe
    assert (last.scoring.criterion, last.plan.sparsity, last.seed, last.model.source) == ("taylor", 0.9, 1, "mlp")
    assert last.measure.latency is False  # the rest of the recipe is kept


def test_bare_names_resolve_to_their_one_field_and_dotted_paths_are_checked():
    assert resolve_field("criterion") == "scoring.criterion"
    assert resolve_field("sparsity") == "plan.sparsity"
    assert resolve_field("seed") == "seed"  # a top-level field is itself (finetune.seed is another)
    assert resolve_field("plan.scope") == "plan.scope" and resolve_field("method.name") == "method.name"
    assert resolve_field("method.rounds") == "method.rounds"  # a method's own parameter
    with pytest.raises(ExplorerError, match=r"several parts \(budget.epochs, finetune.epochs\)"):
        resolve_field("epochs")
    with pytest.raises(ExplorerError, match="no Recipe has a field 'sparsty'.*did you mean sparsity"):
        resolve_field("sparsty")
    with pytest.raises(ExplorerError, match="'plan' has no field 'bogus'"):
        resolve_field("plan.bogus")
    with pytest.raises(ExplorerError, match="'nowhere' which is no part|no part of a Recipe"):
        resolve_field("nowhere.x")
    name, points = expand({**BASE, "grid": {"method": ["one_shot", "iterative"], "finetune.epochs": [1]}})
    assert [p.recipe.method.name for p in points] == ["one_shot", "iterative"]
    assert points[0].recipe.finetune.epochs == 1


# --- bad input: one line, exit 2, nothing stored ----------------------------------------------------


def cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("grid, message", [
    (None, "The grid is empty"),
    ({}, "The grid is empty"),
    ({"sparsity": []}, "The grid is empty along 'sparsity'"),
    ({"sparsity": 0.5}, "grid: 'sparsity' must be a list of values, got 0.5"),
    ({"colour": ["red"]}, "no Recipe has a field 'colour'"),
    ({"criterion": ["magnitude", "bogus"], "sparsity": [0.5]},
     "grid point 2 of 2 (scoring.criterion=bogus, plan.sparsity=0.5)"),
    ({"sparsity": [0.5, 0.8, 1.5]}, "grid point 3 of 3 (plan.sparsity=1.5)"),
    ({"sparsity": [0.01 * i for i in range(1, 11)], "seed": list(range(101))}, "1,010 points, more than 1,000"),
])
def test_bad_grids_are_one_line_and_store_nothing(tmp_path, capsys, grid, message):
    error = cli_error(capsys, ["sweep", "--grid", grid_file(tmp_path, grid), "--workers", "1"])
    assert message in error
    assert RunStore().list() == []  # every point is checked before the first runs


def test_more_than_the_limit_runs_with_yes():
    _, points = expand({**BASE, "grid": {"seed": list(range(MAX_POINTS + 1))}}, yes=True)
    assert len(points) == MAX_POINTS + 1


def test_an_unreachable_ray_address_and_a_missing_ray_are_one_line(tmp_path, capsys, monkeypatch):
    path = grid_file(tmp_path, {"sparsity": [0.5]})
    error = cli_error(capsys, ["sweep", "--grid", path, "--backend", "ray", "--address", "127.0.0.1:9"])
    assert "Cannot reach a Ray cluster at 127.0.0.1:9" in error
    assert "--backend ray" in cli_error(capsys, ["sweep", "--grid", path, "--address", "127.0.0.1:9"])
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert f"pip install {backends.RAY_REQUIREMENT}" in cli_error(capsys, ["sweep", "--grid", path, "--backend", "ray"])
    assert RunStore().list() == []


def test_a_validation_subset_of_zero_samples_is_refused(capsys):
    error = cli_error(capsys, ["sensitivity", "--model", "mlp", "--samples", "0"])
    assert "validation subset of 0 samples is empty" in error


# --- the local backend ---------------------------------------------------------------------------------


def test_a_local_pool_stores_every_point_with_the_numbers_of_running_it_alone():
    _, points = expand({**BASE, "plan": {"scope": "global"},
                        "grid": {"criterion": ["magnitude", "taylor"], "sparsity": [0.5, 1.0]}})
    store = RunStore()
    seen = []
    sweep = run_sweep(points, name="pool", workers=2, store=store, progress=lambda f, text: seen.append(f))
    assert len(sweep.results) == 4 and seen[-1] == 1.0 and not sweep.cancelled
    failed = [r for r in sweep.results if "error" in r]  # sparsity 1.0 globally empties every layer
    assert [r["point"]["plan.sparsity"] for r in failed] == [1.0, 1.0]
    assert all("empties" in r["error"] for r in failed)
    finished = [r for r in sweep.results if "error" not in r]
    assert_same_numbers(finished, [p for p in points if p.coords["plan.sparsity"] == 0.5])
    stored = store.list(sweep=sweep.id)
    assert sorted(run.id for run in stored) == sorted(r["run_id"] for r in sweep.results)
    by_id = {run.id: run for run in stored}
    for result in sweep.results:
        run = by_id[result["run_id"]]
        assert run.settings["sweep"]["point"] == result["point"] and run.sweep == sweep.id
        assert Recipe.from_dict(run.recipe) == points[result["index"]].recipe
        assert run.settings.get("error") == result.get("error")
        assert run.name.endswith(" (failed)") == ("error" in result)
        assert run.metrics == result.get("metrics", {})


def test_the_cli_prints_one_json_line_per_point(tmp_path, capsys):
    import json

    assert cli.main(["sweep", "--grid", grid_file(tmp_path, {"sparsity": [0.3, 0.6]}), "--workers", "1",
                     "--name", "two", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["point"] for line in lines] == [{"plan.sparsity": 0.3}, {"plan.sparsity": 0.6}]
    assert all(line["sweep"].startswith("two (") and line["run_id"] and "metrics" in line for line in lines)
    assert [run.sweep for run in RunStore().list()] == [lines[0]["sweep"]] * 2


def test_a_cancel_starts_no_new_point_and_keeps_the_finished_ones():
    _, points = expand({**BASE, "grid": {"sparsity": [0.2, 0.4, 0.6, 0.8]}})
    cancel = threading.Event()

    def stop_after_the_first_point(fraction, text):
        if fraction > 0:
            cancel.set()

    sweep = run_sweep(points, workers=1, store=RunStore(), cancel=cancel, progress=stop_after_the_first_point)
    assert sweep.cancelled and len(sweep.results) == 1
    assert [run.id for run in RunStore().list()] == [sweep.results[0]["run_id"]]


def test_sensitivity_on_a_local_pool_equals_the_single_process_scan(capsys):
    import json

    argv = ["sensitivity", "--model", "mlp", "--sparsities", "0.3,0.7", "--samples", "200", "--json"]
    assert cli.main(argv + ["--backend", "local", "--workers", "2"]) == 0
    split = json.loads(capsys.readouterr().out)
    from explorer import pipeline
    from explorer.specs import ModelSpec

    model, dataset, _ = pipeline.resolve_model(ModelSpec(source="mlp", baseline=False))
    with backends.torch_threads(1):
        single = sensitivity.scan(model, dataset, ScoringSpec(), sparsities=[0.3, 0.7], samples=200)
    assert split["cells"] == single.to_dict()["cells"] and split["order"] == single.order
    assert split["units"] == single.units and split["base"] == single.base


# --- Ray ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance for the module, sharing the tests' baseline cache (conftest's)."""
    ray = pytest.importorskip("ray")
    base = tmp_path_factory.getbasetemp()
    runtime_env = backends.ray_runtime_env(local=False)
    runtime_env["env_vars"] = {"PRUNING_EXPLORER_CACHE": str(base / "cache")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    yield ray
    ray.shutdown()


def test_ray_gives_the_numbers_of_the_local_pool(local_ray):
    _, points = expand({**BASE, "grid": {"criterion": ["magnitude", "taylor"], "sparsity": [0.5, 0.8]}})
    store = RunStore()
    on_ray = run_sweep(points, name="ray", backend="ray", workers=2, store=store)
    assert_same_numbers(on_ray.results, points)
    assert len(store.list(sweep=on_ray.id)) == 4


def test_stopping_early_on_ray_cancels_the_tasks_in_flight(local_ray):
    """The module's Ray outlives the call (as a cluster does): its two CPUs must be free again.

    Without the cancel the two 600 s sleeps hold both CPUs and the follow-up waits (checked by hand).
    """
    import time

    calls = backends.run_tasks(time.sleep, [(0,), (600,), (600,)], backend="ray", workers=3)
    assert next(calls) == (0, None, None)
    calls.close()  # as after Ctrl-C: the two 600 s sleeps are in flight (or queued), one per CPU
    finished = []
    follow_up = threading.Thread(target=lambda: finished.extend(
        backends.run_tasks(math.factorial, [(3,), (4,)], backend="ray", workers=2)), daemon=True)
    follow_up.start()
    follow_up.join(timeout=120)
    assert sorted(finished) == [(0, 6, None), (1, 24, None)]


def test_a_scan_split_over_ray_equals_the_single_process_scan(local_ray):
    from explorer import pipeline
    from explorer.specs import ModelSpec
    from explorer.sweep import scan_on

    model, dataset, _ = pipeline.resolve_model(ModelSpec(source="lenet5", baseline=False))
    options = dict(sparsities=[0.5, 0.9], samples=100)
    with backends.torch_threads(1):
        single = sensitivity.scan(model, dataset, ScoringSpec(criterion="taylor"), **options)
    split = scan_on(model, dataset, ScoringSpec(criterion="taylor"), backend="ray", workers=2, **options)
    assert split.cells == single.cells and split.order == single.order and split.units == single.units


# --- the Compare page -----------------------------------------------------------------------------------


def _stored(store, sweep, criterion, sparsity, accuracy, error=None):
    recipe = Recipe.from_dict({**BASE, "scoring": {"criterion": criterion}, "plan": {"sparsity": sparsity}})
    point = {"scoring.criterion": criterion, "plan.sparsity": sparsity}
    settings = {"sweep": {"id": sweep, "index": 0, "point": point}} if sweep else {}
    metrics = {} if error else {"accuracy": accuracy, "base_accuracy": 0.97, "sparsity_actual": sparsity,
                                "task": {"name": "accuracy", "measure": "accuracy", "base": 0.97, "pruned": accuracy}}
    if error:
        settings["error"] = error
    return store.save(Run.from_recipe(recipe, model_name="mlp", dataset="digits", settings=settings, metrics=metrics,
                                      sweep=sweep or ""))


def test_the_compare_page_filters_and_plots_one_sweep():
    store = RunStore()
    _stored(store, "", "magnitude", 0.3, 0.95)
    for criterion, accuracies in (("magnitude", (0.96, 0.9)), ("taylor", (0.94, 0.7))):
        for sparsity, accuracy in zip((0.5, 0.8), accuracies):
            _stored(store, "grid-a", criterion, sparsity, accuracy)
    _stored(store, "grid-a", "random", 0.8, None, error="This plan empties fc1")
    _stored(store, "grid-b", "magnitude", 0.9, 0.5)
    at = AppTest.from_file("../app_pages/compare.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="cmp_sweep").options == ["all runs", "grid-b", "grid-a"]
    assert len(at.dataframe[0].value) == 6  # every finished run
    at.selectbox(key="cmp_sweep").set_value("grid-a").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert sorted(table["accuracy"]) == [0.7, 0.9, 0.94, 0.96]
    assert sorted(table["scoring.criterion"].unique()) == ["magnitude", "taylor"]
    assert "scoring.criterion=random, plan.sparsity=0.8: This plan empties fc1" in at.warning[0].value
    assert at.selectbox(key="cmp_sweep_x").value == "plan.sparsity"
    assert at.selectbox(key="cmp_sweep_color").value == "scoring.criterion"
    chart = next(c for c in at.get("plotly_chart") if "cmp_sweep_chart" in str(c.proto.id))
    figure = __import__("json").loads(chart.proto.spec)
    assert {trace["name"] for trace in figure["data"]} == {"magnitude", "taylor"}


def test_a_local_pool_does_not_rerun_the_parents_main_script(tmp_path, monkeypatch):
    """Streamlit installs each page as __main__; spawned workers must not run it again."""
    import types

    script = tmp_path / "page.py"
    script.write_text("raise SystemExit('a worker ran the main script')\n")
    page = types.ModuleType("__main__")
    page.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", page)
    results = sorted(backends.run_tasks(math.factorial, [(3,), (4,), (5,)], backend="local", workers=2))
    assert results == [(0, 6, None), (1, 24, None), (2, 120, None)]
    assert sys.modules["__main__"] is page  # put back afterwards


# --- the store never loses or merges a sweep's work (issue 23) ----------------------------------------


def test_two_sweeps_of_one_name_in_one_second_get_two_ids():
    _, points = expand({**BASE, "grid": {"sparsity": [0.5]}})
    store = RunStore()
    first, second = (run_sweep(points, name="grid", workers=1, store=store) for _ in range(2))
    assert first.id != second.id and first.id.startswith("grid (") and second.id.endswith(" #2")
    assert store.sweeps() == [first.id, second.id]
    assert [len(store.list(sweep=s.id)) for s in (first, second)] == [1, 1]


def test_a_damaged_store_stops_a_sweep_before_its_first_point(tmp_path, capsys):
    data = tmp_path / "data"
    damage(data / "runs.sqlite")
    assert cli.main(["sweep", "--grid", grid_file(tmp_path, {"sparsity": [0.3, 0.6]}), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(data / "runs.sqlite") in err and "move it away" in err
    assert not (data / "unsaved").exists()  # nothing ran, so nothing needed keeping


def test_a_read_only_store_stops_a_sweep_before_its_first_point(tmp_path, capsys):
    data = tmp_path / "data"
    RunStore(data).save(Run("mlp", "digits", "unstructured", "magnitude", "local", 0.5))
    if not freeze(data / "runs.sqlite"):
        pytest.skip("cannot make a file read-only here (root without chattr)")
    try:
        code = cli.main(["sweep", "--grid", grid_file(tmp_path, {"sparsity": [0.3]}), "--workers", "1"])
    finally:
        thaw(data / "runs.sqlite")
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "read-only" in err and str(data / "runs.sqlite") in err and "PRUNING_EXPLORER_DATA" in err


def test_points_the_store_refuses_mid_sweep_are_kept_in_one_file(tmp_path):
    _, points = expand({**BASE, "grid": {"sparsity": [0.2, 0.4, 0.6]}})
    store = RunStore()
    texts, frozen = [], []

    def freeze_after_the_first_point(fraction, text):
        texts.append(text)
        if fraction > 0 and not frozen:
            frozen.append(freeze(store.db_path))

    try:
        sweep = run_sweep(points, name="kept", workers=1, store=store, progress=freeze_after_the_first_point)
    finally:
        thaw(store.db_path)
    if not frozen[0]:
        pytest.skip("cannot make a file read-only here (root without chattr)")
    assert [r["index"] for r in sweep.results] == [0, 1, 2] and all("metrics" in r for r in sweep.results)
    assert (sweep.stored, sweep.unsaved) == (1, 2) and "read-only" in sweep.store_error
    assert [run.settings["sweep"]["index"] for run in store.list(sweep=sweep.id)] == [0]
    kept = json.loads(Path(sweep.kept).read_text())
    assert [Run(**entry).settings["sweep"]["point"] for entry in kept] == [r["point"] for r in sweep.results[1:]]
    assert all(entry["sweep"] == sweep.id and entry["metrics"] for entry in kept)
    assert sum(f"kept in {sweep.kept}" in text for text in texts) == 1  # said once, on the first refused point
    assert [r.get("kept") for r in sweep.results] == [None, sweep.kept, sweep.kept]


def test_the_cli_names_the_file_that_holds_refused_points(tmp_path, capsys, monkeypatch):
    from explorer.store import StoreError

    saved = RunStore.save

    def refuse_after_one(self, run, *args, **kwargs):
        if self.list():
            raise StoreError(f"The run store {self.db_path} is read-only (simulated): fix the permissions.")
        return saved(self, run, *args, **kwargs)

    monkeypatch.setattr(RunStore, "save", refuse_after_one)
    assert cli.main(["sweep", "--grid", grid_file(tmp_path, {"sparsity": [0.3, 0.6]}), "--workers", "1",
                     "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2  # both points printed
    [line] = [line for line in captured.err.splitlines() if line.startswith("sweep: ")]
    kept = line.split("kept in ")[1].split(". ")[0]
    assert "1 of 2 points are not in the run store" in line and "read-only (simulated)" in line
    assert [entry["settings"]["sweep"]["point"] for entry in json.loads(Path(kept).read_text())] == \
        [{"plan.sparsity": 0.6}]


def _descendants(pid: int) -> set[int]:
    """Live processes below ``pid``, read from /proc (psutil is not a dependency)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_ends_the_pool_workers_and_keeps_the_stored_points(tmp_path, stop):
    """SIGTERM and Ctrl-C: the sweep ends its workers and says what it kept; SIGKILL: they die with it."""
    import os
    import signal
    import subprocess
    import time

    data = tmp_path / "data"
    grid = grid_file(tmp_path, {"sparsity": [round(0.01 * i, 2) for i in range(1, 61)]})
    env = {**os.environ, "PRUNING_EXPLORER_DATA": str(data)}
    sweep = subprocess.Popen([sys.executable, "-m", "explorer", "sweep", "--grid", grid, "--workers", "2"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store, workers = RunStore(data), set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sweep.poll() is None:
            workers |= _descendants(sweep.pid)
            if store.db_path.exists() and store.list():
                break
            time.sleep(0.1)
        assert sweep.poll() is None, sweep.communicate()
        assert store.list(), "no point was stored in time"
        workers |= _descendants(sweep.pid)
        assert len(workers) >= 2  # the pool's workers (and spawn's resource tracker)
        sweep.send_signal(getattr(signal, stop))
        out, err = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the sweep"
    if stop == "SIGKILL":  # no clean-up ran: the workers went by PR_SET_PDEATHSIG; the stored points stay
        assert sweep.returncode == -signal.SIGKILL and store.list()
        return
    assert sweep.returncode == 128 + getattr(signal, stop), err
    [line] = [line for line in err.splitlines() if f"stopped by {stop}" in line]
    stored = store.list()
    assert f": {len(stored)} of 60 points stored in {store.db_path}" in line
    assert "Traceback" not in err and len(stored) < 60
    assert {run.sweep for run in stored} == {line.split("'")[1]}
