"""Shared fixtures: Prefect on a throw-away home, media files made with ffmpeg."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    from data_schemas.config import ShardConfig
    from model.text_cache import captions_from_shards, fill_cache
    from model.text_encoder import WAN_NEGATIVE_PROMPT, build_tiny_text_encoder
    from preprocess.shards import write_shards
    from tests.test_shards import make_workspace

    ws = tmp_path_factory.mktemp("train-ws")
    make_workspace(ws, num_clips=4)
    write_shards(ws, ShardConfig(val_fraction=0.0))
    texts = captions_from_shards(ws / "shards" / "index.parquet") + [WAN_NEGATIVE_PROMPT]
    fill_cache(ws / "embeddings", build_tiny_text_encoder(), texts)
    return ws


@pytest.fixture(scope="session")
def real_architecture(tmp_path_factory) -> tuple[Path, str]:
    """``multianimate weights --random-real-architecture`` run once for the session (5.3 GB,
    ~45 s): (the folder, the command's output). Tests only read it."""
    folder = tmp_path_factory.mktemp("real-arch") / "weights"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "400"}  # rich wraps at the terminal width
    done = subprocess.run([sys.executable, "-m", "flows.cli", "weights", "--random-real-architecture", str(folder)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, done.stdout


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly with an argument list; fail the test with its message."""
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def make_test_video(path: Path, *, size: str = "160x120", rate: int = 25, seconds: float = 2.0, faststart=True, extra=()):
    """A busy test-pattern H.264 video."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *extra]
    if faststart:
        args += ["-movflags", "+faststart"]
    ffmpeg(*args, str(path))
    return path
