"""The ingest stage: raw video files -> validated, deduplicated, normalised clips.

    find_videos -> sha256_file -> ingest_video (probe, test-decode + scene scores,
    plan clips, one ffmpeg encode split at the cuts, check each clip with decord)

Bad input never raises: it becomes an ``IngestResult`` with a reason and a message that
names the file. Only the environment (a full disk, a missing ffmpeg) raises.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from data_schemas.atomic import publish, temp_path_for
from data_schemas.config import IngestConfig
from data_schemas.video import ClipRecord, FailureReason, ProbeInfo, VideoRecord, VideoStatus
from preprocess import media

CLIPS_DIR = "clips"


@dataclass(frozen=True)
class FoundFile:
    """A candidate file; ``reason``/``error`` are set when it cannot even be read."""

    path: Path
    size_bytes: int | None = None
    reason: FailureReason | None = None
    error: str | None = None


class IngestResult(BaseModel):
    """What ingesting one file's content produced. Independent of the file's name, so that
    it can be cached by content hash."""

    model_config = ConfigDict(frozen=True)

    status: VideoStatus
    reason: FailureReason | None = None
    error: str | None = None
    probe: ProbeInfo | None = None
    num_frames: int | None = None
    clips: tuple[ClipRecord, ...] = ()

    @classmethod
    def failed(cls, reason: FailureReason | str, error: str, probe: ProbeInfo | None = None) -> IngestResult:
        return cls(status=VideoStatus.failed, reason=FailureReason(reason), error=error, probe=probe)


def find_videos(folder: Path, extensions: tuple[str, ...]) -> list[FoundFile]:
    """Every file under ``folder`` whose name ends in one of ``extensions``, sorted.

    Directory symlinks are followed, but each real directory is walked once, so symlink
    loops end. File symlinks that loop or dangle are reported, not skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    wanted = tuple(e.lower() for e in extensions)
    seen_dirs: set[tuple[int, int]] = set()
    found: list[FoundFile] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        # A symlink to a folder that carries a video name is a candidate too (and rejected).
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if name.lower().endswith(wanted):
                found.append(_check_file(Path(dirpath) / name))
    return sorted(found, key=lambda f: f.path)


def _check_file(path: Path) -> FoundFile:
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return FoundFile(path, None, FailureReason.symlink_loop, f"{path}: symbolic link loop")
        return FoundFile(path, None, FailureReason.unreadable, f"{path}: cannot be read ({exc.strerror})")
    if stat.S_ISDIR(st.st_mode):
        return FoundFile(path, None, FailureReason.not_a_video, f"{path}: a folder, not a video")
    if not stat.S_ISREG(st.st_mode):
        return FoundFile(path, None, FailureReason.not_a_video, f"{path}: not a regular file")
    if st.st_size == 0:
        return FoundFile(path, 0, FailureReason.not_a_video, f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        return FoundFile(path, st.st_size, FailureReason.unreadable, f"{path}: permission denied")
    return FoundFile(path, st.st_size)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Streaming sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (width, height) down so the longer side is <= max_side; both even, >= 2."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


Interval = tuple[int, int, bool]  # [start frame, end frame), keep?


def plan_clips(scores, fps: float, cfg: IngestConfig, keyframes: set[int] = frozenset()) -> list[Interval]:
    """Split a normalised video into intervals of frames that cover it, each kept or dropped.

    A scene starts at every frame whose scene score exceeds the threshold. Scenes shorter
    than ``min_clip_s`` are dropped; longer than ``max_clip_s`` are split evenly, each inner
    split moved to the nearest keyframe when the pieces stay within the limits (a cut on a
    keyframe costs no re-encoding).
    """
    num_frames = len(scores)
    min_frames = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
    max_frames = max(min_frames, math.floor(cfg.max_clip_s * fps + 1e-6))
    starts = [0] + [i for i in range(1, num_frames) if scores[i] > cfg.scene_threshold]
    intervals: list[Interval] = []
    for start, end in zip(starts, starts[1:] + [num_frames]):
        length = end - start
        if length < min_frames:
            intervals.append((start, end, False))
            continue
        pieces = math.ceil(length / max_frames)
        if length // pieces < min_frames:
            pieces = max(1, length // min_frames)
        bounds = [start + round(length * k / pieces) for k in range(pieces + 1)]
        for k in range(1, pieces):
            snapped = min((f for f in keyframes if bounds[k - 1] < f < bounds[k + 1]), key=lambda f: abs(f - bounds[k]), default=None)
            if snapped is not None and all(min_frames <= b - a <= max_frames for a, b in ((bounds[k - 1], snapped), (snapped, bounds[k + 1]))):
                bounds[k] = snapped
        intervals.extend((a, b, True) for a, b in zip(bounds, bounds[1:]))
    return intervals


def _timeout(duration_s: float | None, cfg: IngestConfig) -> float:
    return max(cfg.decode_timeout_min_s, cfg.decode_timeout_factor * (duration_s or 0.0))


def clip_id_for(sha256: str, index: int) -> str:
    return f"{sha256[:16]}-{index:03d}"


def ingest_video(path: Path, sha256: str, cfg: IngestConfig, workspace: Path) -> IngestResult:
    """Probe, validate and normalise one file into ``workspace/clips/<clip_id>.mp4``."""
    path = Path(path)
    try:
        probe = media.probe(path, cfg.probe_timeout_s)
    except media.MediaError as exc:
        return IngestResult.failed(exc.reason, str(exc))
    width, height = probe.display_size
    if width * height > cfg.max_pixels:
        return IngestResult.failed("too_large", f"{path}: {width}x{height} exceeds {cfg.max_pixels} pixels", probe)
    if probe.duration_s and probe.duration_s > cfg.max_duration_s:
        return IngestResult.failed("too_large", f"{path}: {probe.duration_s:.0f} s exceeds {cfg.max_duration_s:.0f} s", probe)
    if probe.num_frames == 0 or width == 0 or height == 0:
        return IngestResult.failed("zero_frames", f"{path}: the video stream has no frames", probe)
    if probe.duration_s is not None and probe.duration_s < cfg.min_clip_s:
        return IngestResult.failed("too_short", f"{path}: {probe.duration_s:.2f} s is shorter than {cfg.min_clip_s} s", probe)

    clips_dir = Path(workspace) / CLIPS_DIR
    clips_dir.mkdir(parents=True, exist_ok=True)
    staging = temp_path_for(clips_dir / sha256[:16])
    staging.mkdir()
    try:
        return _normalise_and_cut(path, sha256, probe, cfg, staging, clips_dir)
    except media.MediaError as exc:
        return IngestResult.failed(exc.reason, str(exc), probe)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _normalise_and_cut(path, sha256, probe, cfg, staging: Path, clips_dir: Path) -> IngestResult:
    encoder = dict(vcodec="libx264", pix_fmt="yuv420p", crf=cfg.crf, preset=cfg.preset)
    gop = max(1, round(cfg.fps * cfg.keyframe_interval_s))
    timeout = _timeout(probe.duration_s, cfg)
    whole = staging / "whole.mp4"
    size = target_size(*probe.display_size, cfg.max_side)
    scores, errors = media.normalise(path, whole, fps=cfg.fps, size=size, gop=gop, timeout=timeout, crf=cfg.crf, preset=cfg.preset)
    num_frames = len(scores)
    problem = _decode_problem(probe, num_frames / cfg.fps, errors)
    if problem:
        reason = "zero_frames" if num_frames == 0 and not errors else "undecodable"
        return IngestResult.failed(reason, f"{path}: {problem}", probe)
    if num_frames < cfg.min_clip_s * cfg.fps - 1e-6:
        return IngestResult.failed(
            "too_short", f"{path}: {num_frames} frames at {cfg.fps:g} fps is shorter than {cfg.min_clip_s} s", probe
        )

    needs_split = any(scores[1:] > cfg.scene_threshold) or num_frames > cfg.max_clip_s * cfg.fps
    keyframes = media.keyframes(whole, cfg.fps) if needs_split else set()
    intervals = plan_clips(scores, cfg.fps, cfg, keyframes)
    if not any(keep for _, _, keep in intervals):
        return IngestResult.failed("too_short", f"{path}: no scene lasts {cfg.min_clip_s} s", probe)
    if len(intervals) == 1:
        segments = [whole]
    else:
        cuts = [start for start, _, _ in intervals[1:]]
        on_keyframes = all(cut in keyframes for cut in cuts)
        media.split(whole, staging / "%04d.mp4", cuts, cfg.fps, reencode=None if on_keyframes else encoder, timeout=timeout)
        segments = sorted(staging.glob("[0-9]*.mp4"))
    assert len(segments) == len(intervals), f"{path}: {len(segments)} segments for {len(intervals)} intervals"

    records: list[ClipRecord] = []
    for segment, (start, end, keep) in zip(segments, intervals):
        if not keep:
            continue
        clip_id = clip_id_for(sha256, len(records))
        count, width, height = media.count_and_check_frames(segment)
        assert count == end - start, f"{path}: clip {clip_id} has {count} frames, planned {end - start}"
        final = clips_dir / f"{clip_id}.mp4"
        records.append(
            ClipRecord(
                clip_id=clip_id,
                source_sha256=sha256,
                source_path=os.fspath(path),
                clip_index=len(records),
                start_s=round(start / cfg.fps, 6),
                end_s=round(end / cfg.fps, 6),
                num_frames=count,
                fps=cfg.fps,
                width=width,
                height=height,
                path=f"{CLIPS_DIR}/{final.name}",
                sha256=sha256_file(segment),
                size_bytes=segment.stat().st_size,
            )
        )
        publish(segment, final)
    _remove_outdated_clips(clips_dir, sha256, {r.clip_id for r in records})
    return IngestResult(status=VideoStatus.ok, probe=probe, num_frames=num_frames, clips=tuple(records))


def _decode_problem(probe: ProbeInfo, decoded_s: float, errors: str) -> str | None:
    """Why a full decode counts as failed, or None."""
    last = errors.splitlines()[-1] if errors else ""
    if decoded_s == 0:
        return f"no frame could be decoded ({last})" if errors else "the video stream has no frames"
    # Containers over-report by a frame or two; a real truncation loses far more.
    if probe.duration_s and decoded_s < 0.9 * probe.duration_s - 0.1:
        return f"decoded only {decoded_s:.2f} s of {probe.duration_s:.2f} s, the file is truncated or corrupt ({last or 'no error'})"
    return None


def _remove_outdated_clips(clips_dir: Path, sha256: str, current: set[str]) -> None:
    """Clips of this source from an earlier configuration that no longer exist in this one."""
    for old in clips_dir.glob(f"{sha256[:16]}-*.mp4"):
        if old.stem not in current:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def video_record(found: FoundFile, sha256: str | None, result: IngestResult | None, duplicate_of: str | None = None) -> VideoRecord:
    """The manifest row of one input file."""
    fields: dict = dict(path=os.fspath(found.path), size_bytes=found.size_bytes, sha256=sha256)
    if found.reason is not None:
        fields.update(status=VideoStatus.failed, reason=found.reason, error=found.error)
    elif duplicate_of is not None:
        fields.update(status=VideoStatus.duplicate, duplicate_of=duplicate_of)
    elif result is not None:
        fields.update(status=result.status, reason=result.reason, error=result.error, num_frames=result.num_frames)
        fields.update(num_clips=len(result.clips))
    if result is not None and result.probe is not None:
        fields.update(result.probe.model_dump())
    return VideoRecord(**fields)
