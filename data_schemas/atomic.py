"""Atomic publication of files: write under a temporary name, fsync, rename.

Temporary names carry the writer's host and pid (``.<name>.tmp-<host>-<pid>-<rand>``), so
a later run can tell the leftovers of a killed writer from the files of a live one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+(?P<suffix>\.[^.]*)?$")


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temp_path_for(path: Path) -> Path:
    """A temporary sibling of ``path`` that keeps its suffix (ffmpeg picks muxers by it)."""
    path = Path(path)
    token = secrets.token_hex(4)
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}-{token}{path.suffix}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, path: Path) -> Path:
    """fsync ``tmp`` and rename it onto ``path`` (atomic on one file system)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; publish it as ``path`` on success, remove it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def is_temp_name(name: str) -> bool:
    return _TMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete temporary files under ``root`` left by dead writers on this host.

    Writers still alive (or on other hosts) are left alone, so two runs may share a
    workspace. Returns what was removed.
    """
    removed: list[Path] = []
    root = Path(root)
    if not root.exists():
        return removed
    host = _host()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            match = _TMP_RE.match(name)
            if not match or match["host"] != host or _pid_alive(int(match["pid"])):
                continue
            target = Path(dirpath) / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            removed.append(target)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created, with its folder) for a block: one
    read-merge-write at a time between processes. The kernel drops it when the file closes
    or its process dies, so no stale lock is ever left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
