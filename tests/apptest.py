"""What the AppTest files share: moving between pages, reading texts, waiting for a page's background job."""
import time

import pytest
from streamlit.testing.v1 import AppTest


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def wait_for_job(at: AppTest, key: str = "finetune_job", timeout: float = 90, what: str = "fine-tune"):
    """Rerun the page until the job in ``session_state[key]`` is done; at the deadline cancel it and fail
    with its status (a job left running would train behind the next tests)."""
    assert key in at.session_state, f"no {what} job was started; errors: {texts(at.error)}"
    job = at.session_state[key]
    deadline = time.monotonic() + timeout
    while not job.wait(timeout=0.3):
        if time.monotonic() > deadline:
            where = f"{job.fraction:.0%} done, status '{job.status}'{', cancel requested' if job.cancelled else ''}"
            job.cancel.set()
            pytest.fail(f"the {what} job is not done after {timeout} s: {where}")
        at.run()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return job



def live_slider(at: AppTest, key: str = "prune_live") -> dict:
    """What the live slider (app_pages/live_slider.py) was sent: values, index, base view and patches."""
    import json
    sliders = [e.proto for e in at.get("bidi_component") if key in e.proto.id]
    assert len(sliders) == 1, f"{len(sliders)} live sliders with key {key!r}"
    return json.loads(sliders[0].json)


def shown_view(at: AppTest, key: str = "prune_live") -> dict:
    """The view the browser shows for the slider's current value: cards, figure, warning, note."""
    from app_pages.live_slider import apply_patch
    data = live_slider(at, key)
    return apply_patch(data["base"], data["patches"][data["index"]])


def live_cards(at: AppTest, key: str = "prune_live") -> dict[str, str]:
    """Label -> shown value of the live slider's cards (the Prune page's estimates)."""
    return {card["label"]: card["value"] for card in shown_view(at, key)["cards"]}


def shown_sparsity(at: AppTest) -> float:
    data = live_slider(at)
    return data["values"][data["index"]]


def set_sparsity(at: AppTest, value: float) -> AppTest:
    """What the browser does when a move settles: the value reaches ``prune_sparsity`` and the page reruns."""
    at.session_state["prune_sparsity"] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at
