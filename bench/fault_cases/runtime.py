"""The runtime's fault catalogue, on the real command line (a Prefect temporary server per
run, real ffmpeg): a disk that fills up mid-run, a folder of only broken files, two runs on
one workspace, and a result file that would run code if it were decoded. Each case takes a
fresh temporary folder and returns ``(ok, detail)``; tests/faults/test_faults_runtime.py calls the
same functions and checks more.

The full disk is injected below the Python level, so that it reaches every writer of the
run as a real one does: Prefect's SQLite database in the temporary server (whose failures
reach the command as "500 Internal Server Error"), ffmpeg, Arrow and Python alike. A small
preloaded library (built with the system's C compiler) makes write(2) and its kin fail with
ENOSPC on regular files under the workspace while a flag file exists; the case creates the
flag once the flow has begun, as a disk that another process fills up would."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_schemas.workspace import Workspace
from tests.helpers.cli import cli_env, temp_files

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]
TIMEOUT_S = 300

ENOSPC_SOURCE = r"""
/* While the file $ENOSPC_WHEN exists, writes to regular files under $ENOSPC_ROOT fail with
   ENOSPC, as on a full disk; everything else (pipes, sockets, other folders) is untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int full(int fd, size_t n) {
    const char *root = getenv("ENOSPC_ROOT"), *when = getenv("ENOSPC_WHEN");
    struct stat st;
    if (n == 0 || !root || !when || access(when, F_OK) != 0) return 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len < 0) return 0;
    path[len] = 0;
    if (strncmp(path, root, strlen(root)) != 0) return 0;
    errno = ENOSPC;
    return 1;
}

#define NEXT(name) static __typeof__(name) *next; if (!next) next = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)
static size_t total(const struct iovec *v, int c) { size_t n = 0; for (int i = 0; i < c; i++) n += v[i].iov_len; return n; }

ssize_t write(int fd, const void *b, size_t n) { NEXT(write); return full(fd, n) ? -1 : next(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { NEXT(pwrite); return full(fd, n) ? -1 : next(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { NEXT(pwrite64); return full(fd, n) ? -1 : next(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) { NEXT(writev); return full(fd, total(v, c)) ? -1 : next(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { NEXT(pwritev); return full(fd, total(v, c)) ? -1 : next(fd, v, c, o); }
"""


# ---- helpers ----------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], env=env or cli_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: never happened")
        time.sleep(0.02)


def gated_ffprobe(folder: Path) -> tuple[Path, Path, Path]:
    """An ``ffprobe`` to put first on PATH that, once reached, waits for a gate to open and
    then runs the real one: a run held at a known point. Returns (its folder, the file it
    creates when reached, the file that opens the gate)."""
    folder.mkdir(parents=True, exist_ok=True)
    reached, gate = folder / "reached", folder / "open"
    script = folder / "ffprobe"
    script.write_text(
        f'#!/bin/sh\ntouch "{reached}"\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\nexec "{shutil.which("ffprobe")}" "$@"\n'
    )
    script.chmod(0o755)
    return folder, reached, gate


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def make_videos(folder: Path, count: int, seconds: float = 2.0, size: str = "160x120") -> Path:
    """``count`` distinct H.264 test patterns (each its own hue, so no duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        args = [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size={size}:rate=25:duration={seconds}",
            "-vf",
            f"hue=h={i * 47}",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            str(folder / f"v{i}.mp4"),
        ]
        subprocess.run(args, check=True, capture_output=True)
    return folder


def make_broken_files(folder: Path) -> Path:
    """Files named like videos that are not: text, nothing, a cut-off video."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.mp4").write_text("not a video\n")
    (folder / "empty.mov").write_bytes(b"")
    make_videos(folder / "src", 1)
    (folder / "cut.mp4").write_bytes((folder / "src" / "v0.mp4").read_bytes()[:3000])
    shutil.rmtree(folder / "src")
    return folder


def ingest_problems(workspace: Path, folder: Path) -> list[str]:
    """What is inconsistent after ingesting ``folder``: a file listed other than once, a clip
    missing or not the bytes its manifest names, a temporary left behind, a result file that
    is not our JSON."""
    from data_schemas import ClipRecord, VideoRecord, read_records
    from preprocess.video import sha256_file
    from tasks.common import foreign_result

    problems = []
    ws = Workspace(workspace)
    videos = read_records(ws.videos_manifest, VideoRecord)
    listed = sorted(Path(v.path).name for v in videos if Path(v.path).parent == folder.absolute())
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    if listed != found:
        problems.append(f"the videos manifest lists {listed}, the folder holds {found}")
    for clip in read_records(ws.clips_manifest, ClipRecord):
        path = ws.resolve(clip.path)
        if not path.is_file() or sha256_file(path) != clip.sha256:
            problems.append(f"{path}: missing or not the clip its manifest names")
    problems += [f"{p}: temporary left behind" for p in sorted(temp_files(workspace))]
    results = ws.results
    problems += [f"{p}: {why}" for p in (results.iterdir() if results.is_dir() else []) if (why := foreign_result(p))]
    return problems


def build_enospc(folder: Path) -> Path | None:
    """The preloadable full-disk library, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "enospc.c").write_text(ENOSPC_SOURCE)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(folder / "enospc.so"), str(folder / "enospc.c"), "-ldl"],
        check=True,
        capture_output=True,
    )
    return folder / "enospc.so"


# ---- the cases ----------------------------------------------------------------------------


def run_disk_full(tmp: Path) -> dict:
    """Ingest with a disk that fills up once the flow has begun, then again with space freed.
    Returns the first run's exit code and stderr, and the rerun's."""
    library = build_enospc(tmp / "lib")
    if library is None:
        raise RuntimeError("no C compiler (cc) to build the full-disk injection")
    folder, workspace, flag = make_videos(tmp / "in", 3), tmp / "ws", tmp / "disk-is-full"
    workspace.mkdir()
    env = cli_env(LD_PRELOAD=str(library), ENOSPC_ROOT=str(workspace), ENOSPC_WHEN=str(flag))
    with (tmp / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "ingest", str(folder), "-w", str(workspace), "--workers", "2"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_for(
                lambda: "Beginning flow run" in (tmp / "stderr.txt").read_text(), "the ingest flow beginning", proc
            )
        except RuntimeError:
            proc.kill()
            raise
        flag.touch()  # the disk is full from now on
        code = proc.wait(TIMEOUT_S)
    flag.unlink()  # space freed
    rerun = cli("ingest", str(folder), "-w", str(workspace))
    return {
        "code": code,
        "stderr": (tmp / "stderr.txt").read_text(),
        "rerun": rerun,
        "folder": folder,
        "workspace": workspace,
    }


def case_disk_full(tmp: Path) -> tuple[bool, str]:
    """The disk fills up mid-ingest: the run fails naming ENOSPC on its last line (not the
    API's 500); after space is freed, a rerun completes and every product is consistent."""
    try:
        run = run_disk_full(tmp)
    except RuntimeError as exc:
        return False, str(exc)
    line = last_line(run["stderr"])
    if run["code"] == 0 or "No space left on device" not in line:
        return False, f"exit {run['code']}, last line: {line!r}"
    if run["rerun"].returncode != 0:
        return False, f"the rerun failed: {last_line(run['rerun'].stderr)!r}"
    problems = ingest_problems(run["workspace"], run["folder"])
    return not problems, "; ".join(
        problems
    ) or f"exit {run['code']}, last line {line!r}; the rerun completed, products consistent"


def case_all_inputs_broken(tmp: Path) -> tuple[bool, str]:
    """A folder of only broken files: a non-zero exit, and a last line that counts the reasons."""
    folder = make_broken_files(tmp / "in")
    done = cli("ingest", str(folder), "-w", str(tmp / "ws"))
    line = last_line(done.stderr)
    ok = done.returncode == 1 and line.startswith("error: all 3 input file(s)") and "not_a_video" in line
    return ok, f"exit {done.returncode}, last line {line!r}"


def run_concurrent(tmp: Path, api_url: str | None = None) -> dict:
    """Three ingests of one folder into one workspace: the first, held inside its flow (a
    gated ffprobe); a second, started then; a third with --wait, started then too. The gate
    opens once both have had their say."""
    folder, workspace = make_videos(tmp / "in", 2), tmp / "ws"
    gate_dir, reached, gate = gated_ffprobe(tmp / "gate")
    args = ["ingest", str(folder), "-w", str(workspace)]
    env = cli_env(api_url)
    with (tmp / "first.txt").open("w") as first_out, (tmp / "third.txt").open("w") as third_out:
        first = subprocess.Popen(
            [*CLI, *args],
            env=env | {"PATH": f"{gate_dir}:{env['PATH']}"},
            cwd=REPO,
            stdout=first_out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(reached.exists, "the first run reaching its first ffprobe", first)
            second = cli(*args, env=env)
            third = subprocess.Popen(
                [*CLI, *args, "--wait"], env=env, cwd=REPO, stdout=third_out, stderr=subprocess.STDOUT
            )
            wait_for(lambda: "waiting for workspace" in (tmp / "third.txt").read_text(), "the third run waiting", third)
        finally:
            gate.touch()
        first_code = first.wait(TIMEOUT_S)
        third_running = third.poll() is None  # it waited: it can only have begun now
        third_code = third.wait(TIMEOUT_S)
    return {
        "first": first_code,
        "first_pid": first.pid,
        "second": second,
        "third": third_code,
        "third_after_first": third_running,
        "first_out": (tmp / "first.txt").read_text(),
        "third_out": (tmp / "third.txt").read_text(),
        "folder": folder,
        "workspace": workspace,
    }


def case_concurrent_runs(tmp: Path) -> tuple[bool, str]:
    """Two runs on one workspace: the second refuses at once naming the first (pid and
    command), a third with --wait starts when the first is done; products consistent."""
    try:
        run = run_concurrent(tmp)
    except RuntimeError as exc:
        return False, str(exc)
    line = last_line(run["second"].stderr)
    if run["second"].returncode != 75 or f"pid {run['first_pid']}" not in line or "multianimate ingest" not in line:
        return False, f"the second run: exit {run['second'].returncode}, last line {line!r}"
    if (
        run["first"] != 0
        or run["third"] != 0
        or not run["third_after_first"]
        or "waiting for workspace" not in run["third_out"]
    ):
        return False, f"first exit {run['first']}, third exit {run['third']} (waited: {run['third_after_first']})"
    problems = ingest_problems(run["workspace"], run["folder"])
    return not problems, "; ".join(
        problems
    ) or f"second refused: {line!r}; the third waited, then completed; products consistent"


class _RunsCode:
    """A pickle that, when loaded, creates a file: proof that a result file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle_result(result_file: Path, marker: Path) -> None:
    """Replace a result file with a well-formed Prefect record whose serializer is cloudpickle
    and whose payload runs ``touch marker`` when unpickled."""
    import base64

    record = json.loads(result_file.read_text())
    record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
    record["result"] = base64.encodebytes(pickle.dumps(_RunsCode(marker))).decode()
    result_file.write_text(json.dumps(record))


def run_planted_pickle(tmp: Path, api_url: str | None = None) -> dict:
    """Ingest a folder of broken files (their verdicts are cached), plant a code-running
    pickle at one cached result's key, and ingest again."""
    folder, workspace, marker = make_broken_files(tmp / "in"), tmp / "ws", tmp / "code-ran"
    first = cli("ingest", str(folder), "-w", str(workspace), env=cli_env(api_url))
    results = sorted(Workspace(workspace).results.iterdir())
    if not results:
        raise RuntimeError(f"the first run cached nothing: {last_line(first.stderr)!r}")
    plant_pickle_result(results[0], marker)
    second = cli("ingest", str(folder), "-w", str(workspace), env=cli_env(api_url))
    return {
        "first": first,
        "second": second,
        "planted": results[0],
        "code_ran": marker.exists(),
        "workspace": workspace,
    }


def case_planted_pickle(tmp: Path) -> tuple[bool, str]:
    """A result file that unpickles into code: never decoded; removed with a warning naming
    it, and the task computed again (its file is our JSON again)."""
    try:
        run = run_planted_pickle(tmp)
    except RuntimeError as exc:
        return False, str(exc)
    from tasks.common import foreign_result

    if run["code_ran"]:
        return False, "the planted pickle ran"
    warned = f"removed {run['planted']}" in run["second"].stderr
    rewritten = run["planted"].is_file() and foreign_result(run["planted"]) is None
    return warned and rewritten, f"not run; warned: {warned}; recomputed as JSON: {rewritten}"


CASES = [
    ("disk full mid-ingest: ENOSPC on the last line, rerun consistent", "fault", case_disk_full),
    ("two runs on one workspace: refused, --wait queues", "fault", case_concurrent_runs),
    ("a folder of only broken files: non-zero exit, reasons counted", "hostile", case_all_inputs_broken),
    ("a result file that unpickles into code", "hostile", case_planted_pickle),
]
