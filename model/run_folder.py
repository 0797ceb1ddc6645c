"""One writer per training run folder, and ranks that do not outlive their launcher.

torchrun starts every rank in a session of its own, so a kill of the launcher's process group
(``kill -9`` of the CLI's group, a terminal closed) does not reach the ranks: they would go on
training and writing ``runs/<run>/`` while a rerun writes there too. Three things stop that:

- **Ranks die with their launchers** (``die_with_launcher``): the kernel SIGKILLs a rank when
  its parent, torchrun's agent, dies (PR_SET_PDEATHSIG), and a watchdog thread does when the
  launcher that owns the folder (``LAUNCHER_ENV``: its pid and start time) is gone while the
  agent lives on.
- **The run folder has one owner** (``own_run_folder``): an exclusive flock on the folder
  itself, which the kernel drops when the owner dies, however it dies; a second owner is
  refused with a message naming the first one's pid (``pids/owner.pid``).
- **Every rank holds the lock of its pid file** (``hold_rank``) for its life, with its pid and
  start time in it. A locked pid file is a live rank; an owner stops the ranks a dead owner
  left (signalling a pid only when its start time matches: pids are reused) before it starts
  its own, and a late rank whose launcher is gone refuses to start.

No torch here: a launcher or a test can use this without importing the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from data_schemas.atomic import atomic_write_bytes

LAUNCHER_ENV = "MULTIANIMATE_LAUNCHER"  # "PID START" of the launcher that owns the run folder (set for the ranks)
OWNER_FILE = "pids/owner.pid"  # who owns the run folder now: "PID START HOST" (removed when it lets go)
PIDS_DIR = "pids"
_PR_SET_PDEATHSIG = 1
_HELD_FDS: set[int] = set()  # lock descriptors this process holds


def _drop_held_fds_in_child() -> None:
    # A forked child (a DataLoader worker) would share the parent's locks through inherited
    # descriptors and keep them after the parent's death: closing its copies makes every lock
    # die with the process that took it.
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_drop_held_fds_in_child)


class RunFolderBusy(RuntimeError):
    """Another live run writes this run folder; the message names its pid."""


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), None
    when there is no such live process. A pid is reused; (pid, start) names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is dead, just not reaped


def identity(pid: int | None = None) -> str:
    """``"PID START"`` of a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {process_start(pid)}"


def parse_identity(text: str) -> tuple[int, int] | None:
    parts = text.split()
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def alive(who: tuple[int, int] | None) -> bool:
    return who is not None and process_start(who[0]) == who[1]


def _lock(fd: int) -> bool:
    """A non-blocking exclusive flock; False when another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    _HELD_FDS.add(fd)
    return True


def _release(fd: int) -> None:
    _HELD_FDS.discard(fd)
    os.close(fd)


def _owner_text(run_dir: Path) -> str:
    try:
        text = (run_dir / OWNER_FILE).read_text()
    except OSError:
        return "owner unknown"
    who = parse_identity(text)
    if not alive(who):
        return "owner unknown"
    host = text.split()[2] if len(text.split()) > 2 else "?"
    return f"pid {who[0]} on {host}"


def stop_stale_ranks(run_dir: Path, timeout_s: float = 60.0) -> list[int]:
    """Stop the ranks that a dead owner left running in ``run_dir`` and wait until they are
    gone; returns their pids. A locked pid file is a live rank; its pid is signalled only when
    the file's start time matches the process. SIGKILL, not a request: every product of a rank
    is written temp + rename, so killing it anywhere loses no more than the steps since its
    last checkpoint, which the resumed run redoes. Raises RunFolderBusy when a lock outlives
    ``timeout_s``."""
    stopped: list[int] = []
    deadline = time.monotonic() + timeout_s
    for pid_file in sorted((Path(run_dir) / PIDS_DIR).glob("rank*.pid")):
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while not _lock(fd):
                who = parse_identity(pid_file.read_text())
                if alive(who) and who[0] not in stopped:
                    os.kill(who[0], signal.SIGKILL)
                    stopped.append(who[0])
                if time.monotonic() > deadline:
                    named = f"pid {who[0]}" if alive(who) else "a process its pid and start time do not name"
                    raise RunFolderBusy(
                        f"{pid_file} is still locked by {named} after {timeout_s:.0f} s: a rank of another "
                        f"run writes {run_dir}; stop it, then rerun"
                    )
                time.sleep(0.05)
        finally:
            _release(fd)
    return stopped


@contextlib.contextmanager
def own_run_folder(run_dir: Path, stop_timeout_s: float = 60.0) -> Iterator[dict[str, str]]:
    """Own ``run_dir`` for the duration (module docstring); ranks a dead owner left are stopped
    first. Yields the environment that ties the ranks to this owner (``LAUNCHER_ENV``)."""
    run_dir = Path(run_dir)
    (run_dir / PIDS_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            held = _lock(fd)
        except OSError as exc:  # e.g. NFS, where flock needs a file open for writing
            print(
                f"warning: cannot lock {run_dir} ({exc}); nothing stops two runs writing it",
                file=sys.stderr,
                flush=True,
            )
            held = True
        if not held:
            raise RunFolderBusy(
                f"{run_dir} is in use by another training run ({_owner_text(run_dir)}): "
                "wait for it to finish, or stop it, then rerun"
            )
        stopped = stop_stale_ranks(run_dir, stop_timeout_s)
        if stopped:
            print(
                f"stopped {len(stopped)} rank(s) of an earlier run still running in {run_dir}: pid(s) "
                f"{', '.join(map(str, stopped))}",
                file=sys.stderr,
                flush=True,
            )
        atomic_write_bytes(run_dir / OWNER_FILE, f"{identity()} {socket.gethostname()}\n".encode())
        try:
            yield {LAUNCHER_ENV: identity()}
        finally:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / OWNER_FILE).unlink()
    finally:
        _release(fd)


@contextlib.contextmanager
def hold_rank(run_dir: Path, rank: int) -> Iterator[Path]:
    """Lock ``pids/rank<r>.pid`` for the duration and write this process's pid and start time
    in it. Started by a launcher (``LAUNCHER_ENV``), refuses when that launcher is gone (a late
    rank of a killed one); refuses when the same rank of another run holds the file."""
    run_dir = Path(run_dir)
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is not None and not alive(parse_identity(launcher)):
        raise RunFolderBusy(f"{run_dir}: this rank's launcher (pid {launcher.split()[0]}) is gone; not starting")
    pid_file = run_dir / PIDS_DIR / f"rank{rank}.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if not _lock(fd):
        os.close(fd)
        other = parse_identity(pid_file.read_text())
        raise RunFolderBusy(
            f"{pid_file} is locked by a live process (pid {other[0] if other else '?'}): rank {rank} of "
            f"another run writes {run_dir}"
        )
    try:
        os.ftruncate(fd, 0)  # the file is the lock, so it is rewritten in place, not replaced
        os.pwrite(fd, f"{identity()}\n".encode(), 0)
        yield pid_file
    finally:
        _release(fd)


def die_with_launcher() -> None:
    """Make this rank die with the processes that started it (module docstring): PDEATHSIG for
    its parent, a watchdog thread for the launcher named in ``LAUNCHER_ENV``."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(
                f"warning: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}",
                file=sys.stderr,
                flush=True,
            )
    launcher = parse_identity(os.environ.get(LAUNCHER_ENV, ""))

    def orphaned() -> bool:
        return os.getppid() != parent or (launcher is not None and not alive(launcher))

    if orphaned():  # the parent died before the prctl took hold
        os._exit(1)

    def watch() -> None:
        while not orphaned():
            time.sleep(0.5)
        print(f"rank pid {os.getpid()}: its launcher is gone; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
