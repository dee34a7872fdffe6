"""Shared test setup: Flower and Ray stay offline, quiet and out of the user's home."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    """A private FLWR_HOME for tests that run the flwr CLI."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Partitions computed by tests go to a temporary cache, not the user's ~/.cache."""
    os.environ["FEDTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedtl-cache"))


@pytest.fixture
def task_identity():
    """Messages need a run id; a ServerApp process has one. For tests that build Messages
    outside a Flower process (in-process grids)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
