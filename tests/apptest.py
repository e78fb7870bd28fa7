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


def live_view(at: AppTest, key: str = "prune_chart") -> dict:
    """The data the in-place chart component (app_pages/live_chart.py) was sent: ``figure``, ``cards``, ``src``."""
    import json
    views = [e.proto for e in at.get("bidi_component") if key in e.proto.id]
    assert len(views) == 1, f"{len(views)} live views with key {key!r}"
    return json.loads(views[0].json)


def live_cards(at: AppTest, key: str = "prune_chart") -> dict[str, str]:
    """Label -> shown value of the live view's cards (the Prune page's estimates)."""
    return {card["label"]: card["value"] for card in live_view(at, key)["cards"]}
