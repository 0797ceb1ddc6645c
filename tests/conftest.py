"""Shared fixtures: Prefect on a throw-away home, a training workspace, the real architecture's
random weights. Plain helper functions live in tests/helpers/."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The helpers' asserts report their operands as the tests' own do (before anything imports them).
pytest.register_assert_rewrite("tests.helpers")

# Before anything imports prefect: a private home, no analytics, no server of the user's.
_HOME = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API for the session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def train_workspace(tmp_path_factory) -> Path:
    """A workspace with shards of four synthetic two-person clips and their embeddings."""
    from tests.helpers.workspaces import make_train_workspace

    return make_train_workspace(tmp_path_factory.mktemp("train-ws"), num_clips=4)


@pytest.fixture(scope="session")
def real_architecture(tmp_path_factory) -> tuple[Path, str]:
    """``multianimate weights --random-real-architecture`` run once for the session (5.3 GB,
    ~45 s): (the folder, the command's output). Tests only read it."""
    from tests.helpers.cli import cli_env

    folder = tmp_path_factory.mktemp("real-arch") / "weights"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "weights", "--random-real-architecture", str(folder)],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, done.stdout
