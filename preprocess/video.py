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
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            if name.lower().endswith(wanted):
                found.append(_check_file(Path(dirpath) / name))
    # os.walk lists dangling and looping symlinks among the directories' names too.
    unique = {f.path: f for f in found}
    return [unique[p] for p in sorted(unique)]


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


def plan_clips(times_s, scores, duration_s: float, cfg: IngestConfig) -> tuple[list[float], list[bool]]:
    """Split a video into clips: (cut times, keep flag of each interval between cuts).

    Scenes start at frames whose scene score exceeds the threshold; scenes shorter than
    ``min_clip_s`` are dropped, longer than ``max_clip_s`` split evenly. Cut times sit half
    an output frame before the scene's first frame, so the nearest output frame starts it.
    """
    half_frame = 0.5 / cfg.fps
    starts = [0.0] + [float(t) - half_frame for t, s in zip(times_s[1:], scores[1:]) if s > cfg.scene_threshold]
    ends = starts[1:] + [duration_s]
    cuts: list[float] = []
    keep: list[bool] = []
    for start, end in zip(starts, ends):
        length = end - start
        if length < cfg.min_clip_s:
            pieces, usable = 1, False
        else:
            pieces, usable = math.ceil(length / cfg.max_clip_s), True
            if length / pieces < cfg.min_clip_s:
                pieces = max(1, math.floor(length / cfg.min_clip_s))
        for k in range(pieces):
            piece_start = start + length * k / pieces
            if piece_start > 0:
                cuts.append(piece_start)
            keep.append(usable)
    return _merge_tiny_intervals(cuts, keep, duration_s, min_gap=2.0 / cfg.fps)


def _merge_tiny_intervals(cuts, keep, duration_s, min_gap):
    """Remove cuts closer than ``min_gap``: an empty segment would shift the segment numbering."""
    bounds = [0.0] + list(cuts) + [duration_s]
    out_cuts: list[float] = []
    out_keep: list[bool] = [keep[0]]
    for i, cut in enumerate(cuts):
        previous = out_cuts[-1] if out_cuts else 0.0
        if cut - previous < min_gap or bounds[i + 2] - cut < min_gap:
            out_keep[-1] = out_keep[-1] and keep[i + 1]
            continue
        out_cuts.append(cut)
        out_keep.append(keep[i + 1])
    return out_cuts, out_keep


def _decode_timeout(duration_s: float | None, cfg: IngestConfig) -> float:
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

    timeout = _decode_timeout(probe.duration_s, cfg)
    try:
        times, scores, errors = media.scan_scenes(path, timeout)
    except media.MediaError as exc:
        return IngestResult.failed(exc.reason, str(exc), probe)
    num_frames = len(times)
    problem = _decode_problem(probe, num_frames, errors)
    if problem:
        reason = "zero_frames" if num_frames == 0 and not errors else "undecodable"
        return IngestResult.failed(reason, f"{path}: {problem}", probe)

    frame_s = (1.0 / probe.avg_fps) if probe.avg_fps else (1.0 / cfg.fps)
    duration = float(times[-1]) + frame_s
    if duration < cfg.min_clip_s:
        return IngestResult.failed(
            "too_short", f"{path}: {duration:.2f} s ({num_frames} frames) is shorter than {cfg.min_clip_s} s", probe
        )
    cuts, keep = plan_clips(times, scores, duration, cfg)
    if not any(keep):
        return IngestResult.failed("too_short", f"{path}: no scene lasts {cfg.min_clip_s} s", probe)
    clips = _encode_clips(path, sha256, probe, cuts, keep, duration, cfg, Path(workspace), timeout)
    if isinstance(clips, IngestResult):
        return clips
    return IngestResult(status=VideoStatus.ok, probe=probe, num_frames=num_frames, clips=tuple(clips))


def _decode_problem(probe: ProbeInfo, num_frames: int, errors: str) -> str | None:
    """Why a test decode counts as failed, or None."""
    last = errors.splitlines()[-1] if errors else ""
    if num_frames == 0:
        return f"no frame could be decoded ({last})" if errors else "the video stream has no frames"
    expected = probe.num_frames
    if expected is None and probe.duration_s and probe.avg_fps:
        expected = round(probe.duration_s * probe.avg_fps)
    # Containers over-report by a frame or two; a real truncation loses far more.
    if expected and num_frames < 0.9 * expected - 2:
        return f"decoded only {num_frames} of {expected} frames, the file is truncated or corrupt ({last or 'no error'})"
    return None


def _encode_clips(path, sha256, probe, cuts, keep, duration, cfg, workspace, timeout):
    clips_dir = workspace / CLIPS_DIR
    clips_dir.mkdir(parents=True, exist_ok=True)
    staging = temp_path_for(clips_dir / sha256[:16])
    staging.mkdir()
    try:
        size = target_size(*probe.display_size, cfg.max_side)
        try:
            media.normalise_segments(
                path, staging / "%04d.mp4", cuts, fps=cfg.fps, size=size, crf=cfg.crf, preset=cfg.preset, timeout=timeout
            )
        except media.MediaError as exc:
            return IngestResult.failed(exc.reason, str(exc), probe)
        segments = sorted(staging.glob("*.mp4"))
        assert len(segments) == len(keep), f"{path}: {len(segments)} segments for {len(keep)} intervals"
        bounds = [0.0, *cuts, duration]
        records: list[ClipRecord] = []
        for k, (segment, wanted) in enumerate(zip(segments, keep)):
            if not wanted:
                continue
            clip_id = clip_id_for(sha256, len(records))
            num_frames, width, height = media.count_and_check_frames(segment)
            if num_frames == 0:
                return IngestResult.failed("undecodable", f"{path}: clip {k} came out empty", probe)
            final = clips_dir / f"{clip_id}.mp4"
            records.append(
                ClipRecord(
                    clip_id=clip_id,
                    source_sha256=sha256,
                    source_path=os.fspath(path),
                    clip_index=len(records),
                    start_s=round(max(bounds[k], 0.0), 6),
                    end_s=round(bounds[k + 1], 6),
                    num_frames=num_frames,
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
        return records
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
