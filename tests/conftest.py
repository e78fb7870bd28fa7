"""Shared fixtures: every test gets its own baseline cache and data directory."""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PRUNING_EXPLORER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("PRUNING_EXPLORER_DATA", str(tmp_path_factory.getbasetemp() / "data"))
    yield


@pytest.fixture(autouse=True, scope="session")
def two_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
