"""Ingest's fault catalogue, on the real command line (real ffprobe/ffmpeg, a Prefect
temporary server per run): a probe that hangs or meets an I/O error then a healthy rerun
(issue case 2), a video with random bytes in its middle (case 3), a container that claims
ten times its frames, pictures of 1xN, 1x1 and a declared 16000x16000, and two folders
ingested one after the other into one workspace (case 10). Each case takes a fresh
temporary folder and returns ``(ok, detail)``; tests/faults/test_faults_ingest.py builds its inputs
with the same functions and checks more, in process.

The transient faults are injected as a fake ``ffprobe`` first on PATH: a script that sleeps
past the probe timeout, or one that answers as ffprobe does when read(2) fails with EIO."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from bench.fault_cases.generate import corrupt_middle, driving_video
from data_schemas.workspace import Workspace
from tests.helpers.cli import cli_env

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


# ---- inputs ----------------------------------------------------------------------------


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, capture_output=True)


def good_video(path: Path, seconds: float = 2.0, size: str = "160x120") -> Path:
    """A busy H.264 test pattern; ``seconds`` is the tag that makes two of them differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate=25:duration={seconds}",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        str(path),
    )
    return path


def mid_corrupt_video(path: Path) -> Path:
    """The issue's case 3: a 4 s H.264 file with 4 KB of random bytes in its middle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return corrupt_middle(driving_video(path, seconds=4.0), nbytes=4096)


def overclaiming_avi(path: Path, claimed: int = 500) -> Path:
    """A clean 2 s MJPEG AVI (50 frames) whose headers claim ``claimed`` frames: avih's
    dwTotalFrames and the video strh's dwLength (what ffprobe reports as nb_frames and turns
    into a duration)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2", "-c:v", "mjpeg", "-q:v", "5", str(path))
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.index(b"avih") + 8 + 16, claimed)
    struct.pack_into("<I", data, data.index(b"strh") + 8 + 32, claimed)
    path.write_bytes(bytes(data))
    return path


def thin_video(path: Path, width: int = 2, height: int = 4000) -> Path:
    """A valid H.264 video of 2x4000 pictures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"color=c=red:size={width}x{height}:rate=25:duration=2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        str(path),
    )
    return path


def one_pixel_video(path: Path) -> Path:
    """A valid 2 s FFV1 video of 1x1 pictures (H.264 cannot code odd sizes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".rgb")
    raw.write_bytes(bytes(range(150)))  # 50 frames of one RGB pixel
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "1x1", "-r", "25", "-i", str(raw), "-c:v", "ffv1", str(path))
    raw.unlink()
    return path


def huge_declared_video(path: Path) -> Path:
    """100 KB under a video name whose header (YUV4MPEG2, found by content) declares
    16000x16000 pictures: a 384 MB first frame, if anything believed it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(100_000))
    return path


def fake_ffprobe(folder: Path, behaviour: str) -> Path:
    """A folder holding an ``ffprobe`` to put first on PATH, that appends a line to
    ``folder/calls`` per call and then: ``hang`` sleeps 600 s; ``eio`` answers as ffprobe
    does when reading the file fails with EIO (the message on stderr, exit status 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "hang": "exec sleep 600",
        "eio": 'for last; do :; done; echo "$last: Input/output error" >&2; exit 1',
    }[behaviour]
    script = folder / "ffprobe"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls"\n{body}\n')
    script.chmod(0o755)
    return folder


def calls(fake: Path) -> int:
    """How many times a fake tool was run."""
    log = fake / "calls"
    return len(log.read_text().splitlines()) if log.exists() else 0


PROFILE = "ingest:\n  probe_timeout_s: 1.0\n"  # a hanging probe costs a second per attempt


# ---- the command line ------------------------------------------------------------------


def cli(*args: object, path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=REPO,
        env=cli_env(keep_api_url=True, path_prefix=path_prefix),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def manifest(workspace: Path) -> dict[str, object]:
    """Videos manifest rows by file name."""
    from data_schemas import VideoRecord, read_records

    path = Workspace(workspace).videos_manifest
    return {Path(r.path).name: r for r in read_records(path, VideoRecord)} if path.exists() else {}


def clips(workspace: Path) -> list:
    from data_schemas import ClipRecord, read_records

    path = Workspace(workspace).clips_manifest
    return read_records(path, ClipRecord) if path.exists() else []


# ---- the cases -------------------------------------------------------------------------


def run_transient_probe(tmp: Path, behaviour: str) -> dict:
    """Ingest a good video with a failing ffprobe first on PATH, then again with the real one."""
    folder, workspace = tmp / "in", tmp / "ws"
    good_video(folder / "good.mp4")
    profile = tmp / "profile.yaml"
    profile.write_text(PROFILE)
    fake = fake_ffprobe(tmp / "fake", behaviour)
    first = cli("ingest", folder, "-w", workspace, "-c", profile, path_prefix=fake)
    row = manifest(workspace).get("good.mp4")
    facts = dict(
        first_code=first.returncode,
        first_last=last_line(first),
        attempts=calls(fake),
        first_status=(row.status.value, row.reason.value if row.reason else None) if row else None,
        first_error=row.error if row else None,
        first_clips=len(clips(workspace)),
    )
    second = cli("ingest", folder, "-w", workspace, "-c", profile)
    row = manifest(workspace).get("good.mp4")
    kept = clips(workspace)
    return facts | dict(
        second_code=second.returncode,
        second_last=last_line(second),
        second_status=row.status.value if row else None,
        second_clips=len(kept),
        clip_files=all((workspace / c.path).is_file() for c in kept),
    )


def _transient_verdict(facts: dict, reason: str) -> tuple[bool, str]:
    ok = (
        facts["first_code"] != 0
        and facts["first_status"] == ("failed", reason)
        and facts["attempts"] == 3
        and facts["second_code"] == 0
        and facts["second_status"] == "ok"
        and facts["second_clips"] >= 1
        and facts["clip_files"]
    )
    return ok, (
        f"first run: exit {facts['first_code']}, {facts['first_status']} after {facts['attempts']} attempt(s), "
        f"'{facts['first_last']}'; healthy rerun: exit {facts['second_code']}, {facts['second_status']}, "
        f"{facts['second_clips']} clip(s)"
    )


def case_hanging_probe(tmp: Path) -> tuple[bool, str]:
    return _transient_verdict(run_transient_probe(tmp, "hang"), "timeout")


def case_probe_io_error(tmp: Path) -> tuple[bool, str]:
    return _transient_verdict(run_transient_probe(tmp, "eio"), "io_error")


def run_hostile(tmp: Path, make) -> tuple[subprocess.CompletedProcess[str], dict, list]:
    """Ingest a folder holding the hostile file(s) ``make(folder)`` creates beside a good video."""
    folder, workspace = tmp / "in", tmp / "ws"
    good_video(folder / "good.mp4")
    make(folder)
    done = cli("ingest", folder, "-w", workspace)
    return done, manifest(workspace), clips(workspace)


def case_mid_file_corruption(tmp: Path) -> tuple[bool, str]:
    done, rows, kept = run_hostile(tmp, lambda folder: mid_corrupt_video(folder / "corrupt.mp4"))
    row, good = rows.get("corrupt.mp4"), rows.get("good.mp4")
    ok = (
        done.returncode == 0
        and row is not None
        and row.status == "failed"
        and row.reason == "undecodable"
        and (row.damaged_frames or 0) > 0
        and str(tmp / "in" / "corrupt.mp4") in (row.error or "")
        and good is not None
        and good.status == "ok"
        and {c.source_path for c in kept} == {good.path}
    )
    if row is None:
        return False, f"no manifest row for corrupt.mp4 (exit {done.returncode}: {last_line(done)})"
    return (
        ok,
        f"{row.status.value} ({row.reason.value if row.reason else '-'}), {row.damaged_frames} damaged frame(s): {row.error}",
    )


def case_overclaimed_frames(tmp: Path) -> tuple[bool, str]:
    done, rows, kept = run_hostile(tmp, lambda folder: overclaiming_avi(folder / "claims500.avi"))
    row = rows.get("claims500.avi")
    mine = [c for c in kept if row is not None and c.source_path == row.path]
    ok = (
        done.returncode == 0
        and row is not None
        and row.status == "ok"
        and row.claimed_frames == 500
        and row.num_frames == 50
        and sum(c.num_frames for c in mine) == 50
    )
    return ok, (
        f"not believed: {row.status.value if row else '?'}, claims {row.claimed_frames if row else '?'} frames, "
        f"the decode gave {row.num_frames if row else '?'}, clips hold {sum(c.num_frames for c in mine)}"
    )


def _make_extreme_sizes(folder: Path) -> None:
    thin_video(folder / "thin_2x4000.mp4")
    one_pixel_video(folder / "one_pixel.mkv")
    huge_declared_video(folder / "declares_16000x16000.mp4")


EXTREME_SIZES = {"thin_2x4000.mp4": "too_small", "one_pixel.mkv": "too_small", "declares_16000x16000.mp4": "too_large"}


def case_extreme_sizes(tmp: Path) -> tuple[bool, str]:
    done, rows, kept = run_hostile(tmp, _make_extreme_sizes)
    got = {name: (rows[name].reason.value if rows.get(name) and rows[name].reason else None) for name in EXTREME_SIZES}
    named = all(str(tmp / "in" / name) in (rows[name].error or "") for name in EXTREME_SIZES if name in rows)
    ok = done.returncode == 0 and got == EXTREME_SIZES and named and rows["good.mp4"].status == "ok" and len(kept) == 1
    return ok, "; ".join(f"{name}: {rows[name].error if name in rows else 'missing'}" for name in EXTREME_SIZES)


def two_folders(tmp: Path) -> tuple[Path, Path]:
    """Last week's folder (two videos) and this week's (one new video, one copy of last week's)."""
    from preprocess.synthetic import SyntheticSpec, make_synthetic_video

    week1, week2 = tmp / "week1", tmp / "week2"
    for folder, name, seed in ((week1, "a", 1), (week1, "b", 2), (week2, "c", 3)):
        make_synthetic_video(SyntheticSpec(width=96, height=64, num_frames=30, num_persons=2, seed=seed), folder, name)
    (week2 / "copy of a.mp4").write_bytes((week1 / "a.mp4").read_bytes())
    return week1, week2


def case_two_folders(tmp: Path) -> tuple[bool, str]:
    """Ingest last week's folder, then preprocess this week's into the same workspace: the
    manifests list both folders and the shards hold the clips of both."""
    from data_schemas import read_records
    from data_schemas.shard import ShardSample

    week1, week2 = two_folders(tmp)
    workspace = tmp / "ws"
    # the truth models: both persons found, so the default filters (two or more) keep every clip
    profile = tmp / "truth.yaml"
    profile.write_text("pose:\n  models: truth\nsegment:\n  models: truth\n")
    first = cli("ingest", week1, "-w", workspace)
    second = cli("preprocess", week2, "-w", workspace, "-c", profile)
    rows = {Path(r.path).relative_to(tmp).as_posix(): r for r in manifest(workspace).values()}
    index = Workspace(workspace).shards_index
    sources = {s.source_sha256 for s in read_records(index, ShardSample)} if index.exists() else set()
    contents = {r.sha256 for r in rows.values() if r.status == "ok"}
    ok = (
        first.returncode == 0
        and second.returncode == 0
        and set(rows) == {"week1/a.mp4", "week1/b.mp4", "week2/c.mp4", "week2/copy of a.mp4"}
        and rows["week2/copy of a.mp4"].duplicate_of == str(week1 / "a.mp4")
        and len(contents) == 3
        and sources == contents
    )
    return ok, (
        f"{len(rows)} file(s) listed from {len({r.folder for r in rows.values()})} folder(s); "
        f"shards hold {len(sources)} of {len(contents)} source(s); exits {first.returncode}, {second.returncode} "
        f"({last_line(second)})"
    )


CASES = [
    ("a probe that hangs past its timeout, then a healthy rerun", "fault", case_hanging_probe),
    ("a probe that meets an I/O error, then a healthy rerun", "fault", case_probe_io_error),
    ("two folders ingested one after the other: shards hold both", "fault", case_two_folders),
    ("4 KB of random bytes in the middle of a 4 s H.264 video", "hostile", case_mid_file_corruption),
    ("a container that claims 10x its frames", "hostile", case_overclaimed_frames),
    ("2x4000, 1x1 and declared 16000x16000 pictures", "hostile", case_extreme_sizes),
]
