"""A time limit on torch-pruning's trace: a model whose trace runs too long is refused in one line, in any thread.

torchvision's swin_t and maxvit_t keep torch-pruning's dependency trace busy for more than 10 minutes (its
graph walk, pure Python). Tests never need torchvision: a real trace of a small model under a tiny limit,
and a stand-in for the endless walk (torch-pruning's ``get_pruning_group`` spinning), reproduce both cases.
A call that is not stopped returns "ran to the end" after 30 s, so a broken limit fails instead of hanging.
"""
import json
import threading
import time

import pytest
import torch
import torch_pruning as tp
from streamlit.testing.v1 import AppTest
from torch import nn

from explorer import cli, compat, criteria, deadline, pipeline, structural, zoo
from explorer.errors import ExplorerError
from explorer.specs import ScoringSpec
from tests.test_app_numbers import _untrained_entry


def _spin(seconds: float = 30.0) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "ran to the end"


def _endless_walk(*args, **kwargs):
    """torch-pruning's group walk as it behaves on swin_t: step after step (index mappings), for minutes."""
    mapping = tp.dependency.index_mapping._ConcatIndexMapping(offset=[0, 4])
    end = time.monotonic() + 30
    while time.monotonic() < end:
        mapping([])
    return "ran to the end"


class Windows(nn.Module):
    """Swin-like blocks (windows cut by reshapes and permutes, a rolled residual): many nodes for torch-pruning."""

    def __init__(self, depth: int = 40, channels: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, channels, 1)
        self.mix = nn.ModuleList(nn.Linear(channels, channels) for _ in range(depth))
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        for mix in self.mix:
            windows = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
            windows = mix(windows).view(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
            x = x + torch.roll(windows, (1, 1), dims=(1, 2))
        return self.head(x.mean((1, 2)))


def test_a_check_raises_only_past_its_threads_deadline():
    deadline.check()  # no limit: nothing
    with deadline.limit(None):
        deadline.check()
    with deadline.limit(60):
        deadline.check()
        with deadline.limit(0):
            with pytest.raises(deadline.TimeLimit):
                deadline.check()
        deadline.check()  # the outer limit again
    deadline.check()
    assert not issubclass(deadline.TimeLimit, Exception)  # `except Exception` in torch-pruning lets it through


def test_a_limit_belongs_to_its_thread():
    """Streamlit runs pages (and the app's background jobs) outside the main thread, where signal.alarm cannot."""
    seen = {}

    def other():
        deadline.check()  # the main thread's limit is not this thread's
        with deadline.limit(0):
            try:
                deadline.check()
            except deadline.TimeLimit:
                seen["stopped"] = True

    with deadline.limit(0):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(60)
    assert seen == {"stopped": True}


def test_torch_pruning_steps_are_guarded_once():
    names = ["torch_pruning.dependency.index_mapping._FlattenIndexMapping.__call__ (checked inside)"] + [
        f"{module}.{path}" for module, path in deadline._TORCH_PRUNING_HOT]
    assert deadline.guarded == names  # every step of torch-pruning 1.6.1 listed is wrapped
    assert deadline.guard_torch_pruning() == names  # a second call wraps nothing twice
    with deadline.limit(0), pytest.raises(deadline.TimeLimit):
        _endless_walk()
    wrapped = deadline.checked(len)
    assert deadline.checked(wrapped) is wrapped and wrapped([1, 2]) == 2


@pytest.mark.parametrize("reverse", [False, True])
def test_the_checked_flatten_mapping_maps_indices_as_torch_pruning_does(reverse):
    """swin_t's trace spends single calls of tens of seconds here, so the explorer's copy checks inside its loop."""
    from torch_pruning import _helpers

    mapping = tp.dependency.index_mapping._FlattenIndexMapping(stride=49, reverse=reverse)
    generator = torch.Generator().manual_seed(0)
    idxs = [_helpers._HybridIndex(idx=int(i), root_idx=int(r)) for i, r in
            zip(torch.randint(0, 5000, (3000,), generator=generator), torch.randint(0, 96, (3000,), generator=generator))]
    ours = mapping(idxs)
    assert ours == deadline.originals["_FlattenIndexMapping.__call__"](mapping, idxs) and len(ours) > 2000
    with deadline.limit(0), pytest.raises(deadline.TimeLimit):
        mapping(idxs)


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(deadline.ENV, raising=False)
    assert deadline.trace_limit() == deadline.DEFAULT_TRACE_LIMIT_S
    for value, expected in (("2.5", 2.5), ("0", None), (" 90 ", 90.0)):
        monkeypatch.setenv(deadline.ENV, value)
        assert deadline.trace_limit() == expected
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(deadline.ENV, bad)
        with pytest.raises(ExplorerError, match=f"^{deadline.ENV} must be a number of seconds"):
            deadline.trace_limit()


def test_a_real_trace_past_its_limit_is_refused_and_the_next_trace_works(monkeypatch):
    model, x = Windows().eval(), torch.randn(1, 3, 8, 8)
    monkeypatch.setenv(deadline.ENV, "0")
    started = time.monotonic()
    whole = structural.channel_groups(model, x)  # the unbounded trace: the reference
    unbounded = time.monotonic() - started
    limit = unbounded / 20
    monkeypatch.setenv(deadline.ENV, f"{limit}")
    with pytest.raises(ExplorerError, match=rf"^torch-pruning could not trace this model within {limit:g} s .*"
                                            f"{deadline.ENV}=SECONDS"):
        structural.channel_groups(model, x)
    monkeypatch.setenv(deadline.ENV, "600")
    again = structural.channel_groups(model, x)  # same process, nothing left pending: the same groups
    assert [g.to_dict() for g in again] == [g.to_dict() for g in whole] and whole


def test_an_endless_trace_is_named_by_the_report_and_refused_before_any_scoring_and_by_the_cli(monkeypatch, capsys):
    monkeypatch.setenv(deadline.ENV, "0.2")
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", _endless_walk)  # in place of the real walk
    model, x = zoo.build("lenet5", (1, 28, 28), 10).eval(), torch.randn(1, 1, 28, 28)
    result = compat.report(model, x, calib_batches=1, calib_batch_size=2)
    channel, head = result["structures"]["channel"], result["structures"]["head"]
    assert not channel["ok"] and channel["reason"].startswith("torch-pruning could not trace this model within 0.2 s")
    assert not head["ok"] and result["structures"]["unstructured"]["ok"]

    def no_work(*args, **kwargs):
        raise AssertionError("calibration or scoring started before the refusal")

    monkeypatch.setattr(criteria, "channel_scores", no_work)
    monkeypatch.setattr(pipeline, "calibration", no_work)
    with pytest.raises(ExplorerError, match=r"^torch-pruning could not trace this model within 0\.2 s"):
        pipeline.prepare(model, ScoringSpec("channel", "taylor"), example_input=x)

    assert cli.main(["inspect", "--model", "lenet5", "--compat", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["compat"]["structures"]["channel"]
    assert not reported["ok"] and "within 0.2 s" in reported["reason"] and "\n" not in reported["reason"]


def test_the_model_page_check_refuses_an_endless_trace_in_one_line(monkeypatch):
    monkeypatch.setenv(deadline.ENV, "0.2")
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", _endless_walk)
    at = AppTest.from_file("../app.py", default_timeout=240)
    at.session_state["current_model"] = _untrained_entry("lenet5")
    at.switch_page("app_pages/model.py").run()
    at.button(key="model_compat").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if list(d.value.columns)[:2] == ["structure", "ok"]).set_index("structure")
    assert table["ok"].to_dict() == {"unstructured": True, "nm": True, "channel": False, "head": False}
    assert table.loc["channel", "why"].startswith("torch-pruning could not trace this model within 0.2 s")
