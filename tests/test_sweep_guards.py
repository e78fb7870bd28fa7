"""Sweeps refuse before any work (explorer/sweep.py, explorer/backends.py): a grid past the hard limit, a grid
that names code to import without --trust-factory, and a Ray address where something that is not Ray answers."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from explorer import backends, cli, limits
from explorer.store import RunStore
from tests import hostile

from tests.test_sweep import grid_file, own_store  # noqa: F401 - own_store: the autouse fixture, shared


def cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- the grid's size ------------------------------------------------------------------------------------------

TEN_FIELDS = ["seed", "plan.sparsity", "scoring.criterion", "plan.scope", "plan.min_keep", "scoring.calib_batches",
              "budget.epochs", "finetune.lr", "finetune.batch_size", "measure.batch"]


@pytest.mark.parametrize("grid, points", [
    ({field: list(range(10)) for field in TEN_FIELDS}, 10**10),                 # hung expanding before
    ({"seed": list(range(317)), "plan.sparsity": [i / 400 for i in range(317)]}, 317 * 317),  # just past the limit
    ({"seed": list(range(1000)), "plan.sparsity": [i / 200 for i in range(101)]}, 101_000),
])
def test_a_grid_past_the_hard_limit_is_refused_even_with_yes(tmp_path, capsys, grid, points):
    error = cli_error(capsys, ["sweep", "--grid", grid_file(tmp_path, grid), "--yes"])
    assert error == (f"error: The grid has {points:,} points, more than the limit of {limits.MAX_GRID_POINTS:,} "
                     "(even with --yes): split it into smaller sweeps.")
    assert RunStore().list() == []


# --- factories a grid names -----------------------------------------------------------------------------------


def sweep_in(folder, *flags):
    argv = [sys.executable, "-m", "explorer", "sweep", "--grid", "grid.yaml", "--workers", "1", *flags]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["base source", "grid source", "grid arch"])
def test_a_grid_naming_a_factory_imports_nothing_without_trust_factory(tmp_path, where):
    """``python -m`` puts the working folder on the import path: an ``evil.py`` beside a grid naming ``evil:make``
    (in its recipe, or as one value of a grid list) would be imported by the point that names it."""
    marker, folder = tmp_path / "marker", tmp_path / "sweep"
    folder.mkdir()
    factory = hostile.factory_module(folder, "evil", marker)
    weights = str(hostile.saved_with_arch(folder / "model.pt", "mlp"))
    model, grid = {"source": "mlp", "data": "digits"}, {"plan.sparsity": [0.5]}
    if where == "base source":
        model["source"] = factory
    elif where == "grid source":
        grid["model.source"] = ["mlp", factory]
    else:
        model = {"source": weights, "data": "digits"}
        grid["model.arch"] = [factory]
    (folder / "grid.yaml").write_text(json.dumps({"model": model, "measure": {"latency": False}, "grid": grid}))
    done = sweep_in(folder)
    assert not marker.exists(), "the grid's factory was imported"
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"error: The grid names the Python factory '{factory}': importing it runs its "
                                        "code. If you trust it, pass --trust-factory; a grid file cannot allow it by "
                                        "itself."]
    assert RunStore().list() == []  # no point ran, the mlp one included
    done = sweep_in(folder, "--trust-factory", "--json")
    assert marker.exists() and done.returncode == 0, done.stderr  # the user's flag: the control
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(grid.get("model.source", [0])) and not any("error" in r for r in results)


# --- a Ray address that is not Ray ----------------------------------------------------------------------------


def not_ray(behaviour: str):
    """A loopback TCP server that takes every connection and then says garbage, nothing, or hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            if behaviour == "garbage":
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + os.urandom(64))
            if behaviour == "hang up":
                connection.close()
            else:
                held.append(connection)

    threading.Thread(target=serve, daemon=True).start()
    return server, held


@pytest.mark.parametrize("behaviour", ["garbage", "silence", "hang up"])
def test_a_ray_address_that_is_not_ray_is_one_line_in_bounded_time(tmp_path, capsys, behaviour):
    pytest.importorskip("ray")
    server, held = not_ray(behaviour)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    try:
        error = cli_error(capsys, ["sweep", "--grid", grid_file(tmp_path, {"sparsity": [0.5]}), "--backend", "ray",
                                   "--address", address])
    finally:
        server.close()
        for connection in held:
            connection.close()
    assert time.monotonic() - started < 3 * backends.CONNECT_TIMEOUT_S  # Ray itself waited past 60 s
    assert error.startswith(f"error: {address} takes connections but does not answer as a Ray cluster")
    assert RunStore().list() == []


def test_a_real_ray_cluster_passes_the_check_on_loopback():
    """The control: Ray's own GCS answers the probe (so the check refuses impostors, not Ray)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
        backends.check_backend("ray", f"127.0.0.1:{port}")
        backends.check_backend("ray", f"ray://127.0.0.1:{port}")  # the probe reads the same greeting
    finally:
        ray.shutdown()
