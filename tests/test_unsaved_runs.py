"""Prune and Fine-tune when the run store refuses the run (issue 23): the measured copy stays in the session,
Fine-tune goes on from it, and a refused fine-tune run is measured and kept once, not on every rerun."""
import json

import pytest
import torch
from streamlit.testing.v1 import AppTest

from explorer.models import load_model
from explorer.store import Run, RunStore
from tests.apptest import goto, texts, wait_for_job
from tests.storefaults import damage, freeze, thaw


@pytest.fixture(params=["damaged", "read-only"])
def refusing_store(request, tmp_path, monkeypatch):
    """The app's run store (PRUNING_EXPLORER_DATA) as a damaged file or one that refuses every write."""
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path))
    db = tmp_path / "runs.sqlite"
    if request.param == "damaged":
        damage(db)
        yield db
        return
    RunStore(tmp_path).save(Run(name="before", created=0.0, model_name="mlp", dataset="digits",
                                structure="unstructured", criterion="magnitude", scope="local", sparsity=0.5))
    if not freeze(db):
        pytest.skip("cannot make a file read-only here (root without chattr)")
    yield db
    thaw(db)


def kept_runs(folder) -> list:
    return sorted(folder.glob("unsaved/run-*.json"))


def test_a_refused_apply_keeps_the_pruned_copy_and_fine_tune_goes_on_from_it(refusing_store):
    folder = refusing_store.parent
    at = goto(AppTest.from_file("../app.py", default_timeout=120).run(), "app_pages/prune.py")
    at.button(key="prune_apply").click().run()
    assert not at.exception, [e.value for e in at.exception]
    pruned = at.session_state["pruned_result"]
    [kept] = kept_runs(folder)
    assert pruned["run_id"] is None and f"kept in {kept}" in pruned["unsaved"] and "\n" not in pruned["unsaved"]
    assert [e.value for e in at.error] == [pruned["unsaved"]] and not at.success  # one line, not 'Saved'
    [entry] = json.loads(kept.read_text())
    assert entry["metrics"] == pruned["metrics"]  # the session holds the very run the file keeps
    x = at.session_state["current_model"]["dataset"].x_test[:32]
    assert torch.equal(load_model(kept.with_suffix(".pt"))(x), pruned["module"](x))
    zeros = pruned["module"].fc1.weight == 0
    assert pruned["metrics"]["params_nonzero"] < pruned["metrics"]["params_total"] and zeros.any()

    goto(at, "app_pages/finetune.py")
    assert "not in the run store" in texts(at.markdown)
    at.number_input(key="ft_epochs").set_value(1)
    at.button(key="ft_start").click().run()
    job = wait_for_job(at, timeout=90)
    assert job.error is None and job.result.epochs_done == 1
    tuned = job.result.model
    assert bool((tuned.fc1.weight[zeros] == 0).all())  # trained from the session's pruned copy, its zeros kept
    first, second = kept_runs(folder)[0], [p for p in kept_runs(folder) if p != kept]
    assert first == kept and len(second) == 1
    [entry] = json.loads(second[0].read_text())
    assert entry["stage"] == 1 and entry["recipe"]["finetune"]["epochs"] == 1
    assert entry["metrics"] == job.meta["saved_run"].metrics and job.meta["saved_run"].id is None
    [error] = [e.value for e in at.error]
    assert error == job.meta["save_error"] and f"kept in {second[0]}" in error and "\n" not in error
    assert not at.success and len(at.metric) >= 4  # the measured numbers are shown all the same

    for _ in range(2):  # later reruns show the same line and neither measure nor keep again
        at.run()
        assert not at.exception and [e.value for e in at.error] == [error]
        assert len(kept_runs(folder)) == 2
