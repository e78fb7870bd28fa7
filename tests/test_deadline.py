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
    """torch-pruning's group walk as it behaves on swin_t: Python, for minutes."""
    return _spin()


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


def test_a_call_within_its_limit_returns_its_result_and_nothing_arrives_later():
    assert deadline.within(lambda: 42, 0.05) == 42
    assert deadline.within(lambda: 7, None) == 7
    assert _spin(0.8) == "ran to the end"  # past the limit and a repeat: no stray TimeLimit in later code


def test_an_endless_call_is_stopped_at_its_limit_even_where_it_catches_exceptions():
    started = time.monotonic()
    with pytest.raises(deadline.TimeLimit):
        deadline.within(_spin, 0.1)
    assert time.monotonic() - started >= 0.1

    def catches_exceptions():
        try:
            return _spin()
        except Exception:  # noqa: BLE001 - what careless code does
            return "swallowed"

    def swallows_once():
        try:
            _spin()
        except BaseException:  # noqa: BLE001 - even this: it is raised again
            pass
        return _spin()

    for call in (catches_exceptions, swallows_once):
        with pytest.raises(deadline.TimeLimit):
            deadline.within(call, 0.1)
    assert _spin(0.7) == "ran to the end"


def test_the_limit_holds_in_a_thread_that_is_not_the_main_one():
    """Streamlit runs pages (and the app's background jobs) outside the main thread, where signal.alarm cannot."""
    outcome = {}

    def page():
        try:
            outcome["result"] = deadline.within(_spin, 0.1)
        except deadline.TimeLimit:
            outcome["result"] = "stopped"
        outcome["after"] = _spin(0.7)

    thread = threading.Thread(target=page)
    thread.start()
    thread.join(60)
    assert outcome == {"result": "stopped", "after": "ran to the end"}


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
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", _endless_walk)
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
