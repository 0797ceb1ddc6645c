"""Faults of the shard stage and crafted shards for the loader (issue cases 1 and 7).

Faults: the disk fills up while a new shard set is written (an injected writer, and a real
per-file size limit of the kernel), and the writing process is SIGKILLed. Each time the
previous set must stay linked, whole and consistent with its index, and a rerun must
produce exactly the set an uninterrupted run produces.

Hostile inputs: a shard member whose header claims 2^62 bytes (tarfile would "skip" it by
reading forever), and a shard in which no sample decodes, read with resampling (the
training setting). Each must end with a clear error in bounded time; they run in a child
process with a timeout, so a regression reports a hang instead of hanging the bench.

Run as a module, it is the child process of these cases (``python -m bench.fault_cases.shards ...``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from data_schemas.workspace import CLIPS, MANIFESTS, MASKS, POSES, Workspace

REPO = Path(__file__).resolve().parents[2]
HUGE = 2**62

# The set published before the fault (one shard per split), and the one the fault interrupts
# (one shard per sample, so a fault can fall between shards as well as inside one).
OLD = {"val_fraction": 0.5}
NEW = {"val_fraction": 0.5, "target_shard_bytes": 1}


def shard_config(fields: dict):
    from data_schemas.config import ShardConfig

    return ShardConfig(**fields)


# --------------------------------------------------------------------------- workspaces


def make_inputs(root: Path, num_clips: int = 4) -> Path:
    """A workspace with the clips, poses and masks of ``num_clips`` synthetic clips (two sources)."""
    from tests.helpers.workspaces import make_workspace

    make_workspace(root, num_clips=num_clips)
    return root


def copy_inputs(source: Path, dest: Path) -> Path:
    for name in (MANIFESTS, CLIPS, POSES, MASKS):
        shutil.copytree(source / name, dest / name)
    return dest


def set_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a published set (``workspace/shards`` or a set folder)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def reference_digests(inputs: Path, scratch: Path) -> dict[str, str]:
    """The NEW set as an uninterrupted run writes it, in a copy of the inputs."""
    from preprocess.shards import write_shards

    ws = copy_inputs(inputs, scratch)
    write_shards(ws, shard_config(NEW))
    return set_digests(Workspace(ws).shards)


def set_problems(ws: Path, expected: dict[str, str], when: str) -> list[str]:
    """Why ``ws`` does not hold exactly the set ``expected``, published and nothing else."""
    from data_schemas.atomic import is_temp_name
    from preprocess.shards import verify_shard_set

    link, sets = Workspace(ws).shards, Workspace(ws).shard_sets
    if not link.is_symlink():
        return [f"{when}: {link} is not the link to a shard set"]
    problems = [f"{when}: {p}" for p in verify_shard_set(link)]
    if set_digests(link) != expected:
        problems.append(
            f"{when}: the linked set differs from the expected one ({sorted(set_digests(link))} vs {sorted(expected)})"
        )
    others = [p.name for p in sets.iterdir() if p.name != ".lock" and p.resolve() != link.resolve()]
    # A killed writer's temporary folder may remain until the next run: never a final name.
    finals = [name for name in others if not is_temp_name(name)]
    if finals:
        problems.append(f"{when}: other sets under final names: {finals}")
    return problems


def published_old_set(
    tmp: Path, inputs: Path | None = None, expected: dict[str, str] | None = None
) -> tuple[Path, dict[str, str], dict[str, str]]:
    """(workspace with the OLD set published, its digests, the NEW set's reference digests).
    ``inputs``/``expected``: a workspace of inputs to copy and its reference (else made here)."""
    from preprocess.shards import write_shards

    ws = copy_inputs(inputs, tmp / "ws") if inputs is not None else make_inputs(tmp / "ws")
    write_shards(ws, shard_config(OLD))
    expected = expected if expected is not None else reference_digests(ws, tmp / "reference")
    old = set_digests(Workspace(ws).shards)
    assert old != expected, "the fault must interrupt a set that differs from the published one"
    return ws, old, expected


def rerun_problems(ws: Path, expected: dict[str, str]) -> list[str]:
    """A healthy rerun: it must clear every leftover and publish exactly the reference set."""
    from preprocess.shards import write_shards

    write_shards(ws, shard_config(NEW))
    problems = set_problems(ws, expected, "after the rerun")
    link, sets = Workspace(ws).shards, Workspace(ws).shard_sets
    leftovers = sorted(p.name for p in sets.iterdir() if p.name != ".lock" and p.resolve() != link.resolve())
    if leftovers:
        problems.append(f"after the rerun: leftovers {leftovers}")
    return problems


# --------------------------------------------------------------------------- injected writers


class DiskFull:
    """Opens files on a disk with ``budget`` bytes free, all files together: the write that
    crosses it stores what fits and raises OSError(ENOSPC), like a full file system."""

    def __init__(self, budget: int):
        self.left = budget

    def __call__(self, path: Path) -> _Limited:
        return _Limited(open(path, "xb"), self, path)


class _Limited:
    def __init__(self, raw, disk: DiskFull, path: Path):
        self.raw, self.disk, self.path = raw, disk, path

    def write(self, data: bytes) -> int:
        fits = min(len(data), self.disk.left)
        self.raw.write(data[:fits])
        self.disk.left -= fits
        if fits < len(data):
            self.raw.flush()  # what fitted is on disk, as with a real full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return len(data)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


class StallAfter(DiskFull):
    """A disk that stops answering after ``budget`` bytes: the write blocks for good, after
    creating ``ready`` (so the parent knows the writer is mid-set and can kill it)."""

    def __init__(self, budget: int, ready: Path):
        super().__init__(budget)
        self.ready = ready

    def __call__(self, path: Path) -> _Limited:
        stall = self

        class Stalling(_Limited):
            def write(self, data: bytes) -> int:
                try:
                    return super().write(data)
                except OSError:
                    self.raw.flush()
                    stall.ready.write_text(str(self.path))
                    while True:
                        time.sleep(60)

        return Stalling(open(path, "xb"), self, path)


def _child(*args: str, timeout: float, preexec_fn=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "bench.fault_cases.shards", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


# --------------------------------------------------------------------------- fault cases


def disk_full_at(tmp: Path, budget: int, **reuse) -> tuple[bool, str]:
    """The disk fills after ``budget`` bytes of the new set: previous set intact, rerun equal.
    ``reuse``: ``inputs`` and ``expected`` of published_old_set."""
    from preprocess.shards import write_shards

    ws, old, expected = published_old_set(tmp, **reuse)
    try:
        write_shards(ws, shard_config(NEW), open_file=DiskFull(budget))
    except OSError as error:
        if error.errno != errno.ENOSPC:
            return False, f"raised {error!r}, not ENOSPC"
    else:
        return False, f"the set fitted in {budget} bytes: no fault happened"
    problems = set_problems(ws, old, "after ENOSPC")
    temps = [p.name for p in Workspace(ws).shard_sets.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    if temps:
        problems.append(f"after ENOSPC: temporaries not removed: {temps}")
    problems += rerun_problems(ws, expected)
    return not problems, "; ".join(problems) or f"ENOSPC after {budget} bytes: old set intact, rerun byte-identical"


def case_disk_full(tmp: Path) -> tuple[bool, str]:
    # 70 KB: inside the second tar of the new set (each holds one ~40 KB sample, 51,200 bytes).
    return disk_full_at(tmp, 70_000)


def case_file_size_limit(tmp: Path, **reuse) -> tuple[bool, str]:
    """A real kernel write failure: the writer runs under RLIMIT_FSIZE (EFBIG past 30 KB)."""
    ws, old, expected = published_old_set(tmp, **reuse)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    done = _child("write", str(ws), timeout=300, preexec_fn=limit)
    if done.returncode != 3 or "EFBIG" not in done.stdout:
        return False, f"the limited writer ended {done.returncode}: {done.stdout[-500:]} {done.stderr[-1500:]}"
    problems = set_problems(ws, old, "after EFBIG") + rerun_problems(ws, expected)
    return not problems, "; ".join(problems) or "EFBIG from the kernel mid-shard: old set intact, rerun byte-identical"


def kill_after(tmp: Path, budget: int, **reuse) -> tuple[bool, str]:
    """SIGKILL of a real writer process blocked after ``budget`` bytes of the new set."""
    ws, old, expected = published_old_set(tmp, **reuse)
    ready = tmp / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.fault_cases.shards", "stall", str(ws), str(budget), str(ready)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not ready.exists():
            child.kill()
            out, err = child.communicate()
            return (
                False,
                f"the writer never reached byte {budget} (exit {child.returncode}): {out[-300:]} {err[-1500:]}",
            )
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    temps = [p.name for p in Workspace(ws).shard_sets.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    problems = set_problems(ws, old, "after SIGKILL")
    if not temps:
        problems.append("after SIGKILL: no temporary folder: the kill did not land mid-set")
    problems += rerun_problems(ws, expected)
    where = ready.read_text().rsplit("/", 1)[-1]
    return not problems, "; ".join(
        problems
    ) or f"killed in {where}: old set intact, temporaries cleared, rerun byte-identical"


def case_sigkill(tmp: Path) -> tuple[bool, str]:
    return kill_after(tmp, 70_000)


# --------------------------------------------------------------------------- crafted shards


def real_shard(tmp: Path) -> Path:
    """One tar written by the shard stage (4 samples)."""
    from preprocess.shards import write_shards

    ws = make_inputs(tmp / "ws")
    write_shards(ws, shard_config({"val_fraction": 0.0}))
    return (Workspace(ws).shards / "train-000000.tar").resolve()


def with_huge_member(shard: Path, dest: Path, member_suffix: str = ".ref.png", sample: int = 1) -> Path:
    """``shard`` with the size field of the ``member_suffix`` member of its ``sample``-th sample
    set to 2^62 (GNU base-256, checksum recomputed): a header tarfile accepts, then "skips" by
    reading forever."""
    raw = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = [m for m in tar if m.name.endswith(member_suffix)][sample]
    header = member.offset
    raw[header + 124 : header + 136] = b"\x80" + HUGE.to_bytes(11, "big")
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\x00 " % sum(raw[header : header + 512])
    dest.write_bytes(bytes(raw))
    return dest


def with_undecodable_videos(shard: Path, dest: Path) -> Path:
    """``shard`` with every sample's mp4 replaced by bytes that are not a video."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".mp4"):
                data = b"\x00\x00\x00\x18ftypisom" + b"not a video " * 100
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    dest.write_bytes(out.getvalue())
    return dest


LOADER = {"num_frames": 5, "height": 48, "width": 64}


def _run_loader(*args: str, timeout: float = 180) -> tuple[dict | None, str]:
    """The loader over crafted shards in a child process: (its JSON report, or None on a hang)."""
    try:
        done = _child(*args, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"no answer in {timeout} s (hung)"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return None, f"exit {done.returncode}: {done.stderr[-1500:]}"
    return json.loads(lines[-1]), ""


def case_huge_header(tmp: Path) -> tuple[bool, str]:
    shard = with_huge_member(real_shard(tmp), tmp / "huge-000000.tar")
    report, why = _run_loader("load", str(shard), "exact")
    if report is None:
        return False, why
    ok = (
        report["error"] is None
        and report["counts"]["shard_error"] == 1
        and str(HUGE) in report["warnings"]
        and shard.name in report["warnings"]
        and ".ref.png" in report["warnings"]
        and report["seconds"] < 60
    )
    return ok, f"{report['seconds']:.1f} s, {report['samples']} sample(s) before it, refused: {report['first_error']}"


def case_undecodable_resampled(tmp: Path) -> tuple[bool, str]:
    shard = with_undecodable_videos(real_shard(tmp), tmp / "bad-000000.tar")
    report, why = _run_loader("load", str(shard), "resampled")
    if report is None:
        return False, why
    error = report["error"] or ""
    cause = error.strip().splitlines()[-1] if error.strip() else "no error"  # DataLoader puts the worker's message last
    ok = error.startswith("LoaderStalled") and "bad_video" in cause and "max_consecutive_skips=100" in cause
    ok = ok and report["seconds"] < 120
    return ok, f"{report['seconds']:.1f} s, {report['samples']} batch(es): {cause[:400]}"


CASES = [
    ("disk full while writing a new shard set", "fault", case_disk_full),
    ("file size limit (kernel EFBIG) while writing a new shard set", "fault", case_file_size_limit),
    ("SIGKILL of the process writing a new shard set", "fault", case_sigkill),
    ("shard member whose header claims 2^62 bytes", "hostile", case_huge_header),
    ("resampled shard where no sample decodes", "hostile", case_undecodable_resampled),
]


# --------------------------------------------------------------------------- child processes


def _main(argv: list[str]) -> None:
    command = argv[0]
    if command == "write":  # write the NEW set; exit 3 naming the errno of an OSError
        from preprocess.shards import write_shards

        try:
            write_shards(Path(argv[1]), shard_config(NEW))
        except OSError as error:
            print(f"OSError {errno.errorcode.get(error.errno, error.errno)}: {error}", flush=True)
            sys.exit(3)
    elif command == "stall":  # write the NEW set on a disk that stops answering after argv[2] bytes
        from preprocess.shards import write_shards

        write_shards(Path(argv[1]), shard_config(NEW), open_file=StallAfter(int(argv[2]), Path(argv[3])))
    elif command == "load":  # read argv[1] with the loader ("exact": one pass; "resampled": 2 workers, as training)
        import logging

        from model.data import LoaderConfig, make_dataset, make_loader

        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("model.data").addHandler(handler)
        start, samples, error = time.monotonic(), 0, None
        if argv[2] == "exact":
            dataset = make_dataset(argv[1], LoaderConfig(**LOADER), rank=0, world_size=1)
            batches = iter(dataset)
        else:  # as training reads: resampled, DataLoader workers
            loader = make_loader(
                argv[1],
                LoaderConfig(**LOADER, resampled=True),
                batch_size=1,
                num_workers=2,
                epoch_samples=10,
                rank=0,
                world_size=1,
            )
            dataset, batches = loader.dataset, iter(loader)
        try:
            for _ in batches:
                samples += 1
        except Exception as exn:
            error = f"{type(exn).__name__}: {exn}"
        report = {
            "seconds": time.monotonic() - start,
            "samples": samples,
            "counts": dataset.skips.counts(),
            "error": error,
            "warnings": "\n".join(records),
            "first_error": next((r for r in records if "skipping unreadable" in r), None),
        }
        print(json.dumps(report), flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
