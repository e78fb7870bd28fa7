"""Background jobs: progress, payload, cancel keeping the partial result, errors as one line, wait.

Nothing here races a timer: a job is cancelled from inside its own progress callback, and a job
that must still be running is held on an Event the test releases.
"""
import threading

import pytest
import torch

from explorer import jobs
from explorer.data import load_dataset
from explorer.errors import ExplorerError
from explorer.models import build
from explorer.train import TrainConfig, train


def test_a_job_reports_progress_and_keeps_its_result():
    def count(context):
        for i in range(1, 5):
            context.append("points", (i, i * i))
            context.report(i / 4, f"item {i}/4")
        context.report(status="last words")
        return "all four"

    job = jobs.start(count, name="Counting", meta={"kind": "test"})
    assert job.wait(timeout=30)
    assert job.done and job.result == "all four" and job.error is None and not job.cancelled
    assert job.fraction == 1.0 and job.status == "finished"
    assert job.payload() == {"points": [(1, 1), (2, 4), (3, 9), (4, 16)]}
    job.payload()["points"].clear()  # a copy: the reader cannot change the job's data
    assert len(job.payload()["points"]) == 4 and job.meta == {"kind": "test"}


def test_cancel_from_a_progress_callback_keeps_the_partial_result():
    def work(context):
        done = []
        for item in range(1000):
            if context.cancelled:
                break
            done.append(item)
            context.report((item + 1) / 1000)
            if item == 2:
                context.cancel.set()  # as a Cancel button would, from the callback's point of view
        return done

    job = jobs.start(work)
    assert job.wait(timeout=30)
    assert job.cancelled and job.status == "cancelled" and job.error is None
    assert job.result == [0, 1, 2] and job.fraction == pytest.approx(0.003)


def test_a_cancelled_training_job_keeps_the_partially_trained_copy():
    data = load_dataset("digits")
    model = build("mlp", data.input_shape, data.num_classes)

    def fine_tune(context):
        def progress(p):
            if p.step == 3:
                context.cancel.set()
        return train(model, data, TrainConfig(epochs=3), progress=progress, cancel=context.cancel)

    job = jobs.start(fine_tune, name="Fine-tuning")
    assert job.wait(timeout=60)
    assert job.cancelled and job.error is None
    assert job.result.cancelled and job.result.steps == 3
    assert not torch.equal(job.result.model.classifier.weight, model.classifier.weight)


def test_errors_become_one_line_messages():
    def user_mistake(context):
        raise ExplorerError("The dataset is empty: load one with samples.")

    def bug(context):
        raise ValueError("bad shape (3, 4)\nsecond line of detail")

    def bare_bug(context):
        raise KeyError()

    mistake, crash, bare = jobs.start(user_mistake), jobs.start(bug, name="Scanning"), jobs.start(bare_bug)
    assert all(job.wait(timeout=30) for job in (mistake, crash, bare))
    assert mistake.error == "The dataset is empty: load one with samples." and mistake.result is None
    assert crash.error == "Scanning failed unexpectedly: ValueError: bad shape (3, 4)"
    assert bare.error == "The job failed unexpectedly: KeyError"
    assert crash.status == "failed" and crash.done


def test_wait_returns_false_at_its_deadline_and_true_once_done():
    release = threading.Event()
    job = jobs.start(lambda context: release.wait(timeout=60) and "released")
    assert job.wait(timeout=0.05) is False
    assert not job.done and job.result is None and job.status == "running"
    release.set()
    assert job.wait(timeout=30) is True and job.result == "released"


def test_a_job_starts_once():
    job = jobs.Job(lambda context: 1, name="Once")
    assert job.status == "waiting to start" and not job.done
    job.start()
    with pytest.raises(ExplorerError, match="Once has already been started"):
        job.start()
    assert job.wait(timeout=30) and job.result == 1
