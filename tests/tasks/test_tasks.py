"""Task plumbing: which failures are retried, and what invalidates a cache."""

from __future__ import annotations

import errno

import pytest

from data_schemas import IngestConfig
from tasks.common import is_transient
from tasks.ingest import INGEST_CODE, _ingest_cache_key


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.EIO, "I/O error"), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (TimeoutError("slow disk"), True),
        (FileNotFoundError(errno.ENOENT, "gone"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (ValueError("bad input"), False),
        (AssertionError("bug"), False),
    ],
)
def test_only_transient_errors_are_retried(exc, transient):
    assert is_transient(exc) is transient


def test_ingest_cache_key_is_content_config_and_code():
    params = dict(path="/a.mp4", sha256="ab" * 32, config=IngestConfig(), workspace="/ws")
    key = _ingest_cache_key(None, params)
    assert key == _ingest_cache_key(None, params | {"path": "/renamed.mp4"})  # a rename hits the cache
    assert key != _ingest_cache_key(None, params | {"sha256": "cd" * 32})  # new content misses
    assert key != _ingest_cache_key(None, params | {"config": IngestConfig(fps=30)})  # new config misses
    assert INGEST_CODE in key and len(INGEST_CODE) == 12
