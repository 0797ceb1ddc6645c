"""The ingest stage: raw video files -> validated, deduplicated, normalised clips.

    find_videos -> sha256_file -> ingest_video (probe, test-decode + scene scores,
    plan clips, one ffmpeg encode split at the cuts, check each clip with decord)
    -> merge_manifests (the workspace grows: every folder ever ingested stays listed)

Bad input never raises: it becomes an ``IngestResult`` with a reason and a message that
names the file, a verdict about the content that may be cached. The environment (a
timeout, an I/O error, a full disk, a missing ffmpeg) raises: that is no verdict.

Decode policy: a file is accepted only when its normalising decode is clean. A frame lost
or decoded damaged, or any error of the demuxer or decoder (a truncated file), rejects it
as ``undecodable`` with the count of damaged frames. Frame counts and durations are the
decode's: what the container claims is recorded, never trusted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import math
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from data_schemas.atomic import exclusive_lock, publish, temp_path_for
from data_schemas.config import IngestConfig
from data_schemas.io import SchemaError, read_records, write_records
from data_schemas.mask import MaskRecord
from data_schemas.pose import PoseRecord
from data_schemas.video import PASSING_REASONS, ClipRecord, FailureReason, ProbeInfo, VideoRecord, VideoStatus
from data_schemas.workspace import Workspace
from preprocess import media

# Smallest clip side accepted: Wan works in multiples of 16 px, and nobody can be posed in less.
MIN_SIDE_PX = 16


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
    num_frames: int | None = None  # frames the normalising decode gave, at the clip rate
    damaged_frames: int | None = None  # frames it lost or decoded damaged (None: no decode)
    clips: tuple[ClipRecord, ...] = ()

    @classmethod
    def failed(cls, reason: FailureReason | str, error: str, probe: ProbeInfo | None = None, **decode) -> IngestResult:
        return cls(status=VideoStatus.failed, reason=FailureReason(reason), error=error, probe=probe, **decode)


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
            snapped = min(
                (f for f in keyframes if bounds[k - 1] < f < bounds[k + 1]),
                key=lambda f: abs(f - bounds[k]),
                default=None,
            )
            if snapped is not None and all(
                min_frames <= b - a <= max_frames for a, b in ((bounds[k - 1], snapped), (snapped, bounds[k + 1]))
            ):
                bounds[k] = snapped
        intervals.extend((a, b, True) for a, b in itertools.pairwise(bounds))
    return intervals


def _timeout(duration_s: float | None, cfg: IngestConfig) -> float:
    return max(cfg.decode_timeout_min_s, cfg.decode_timeout_factor * (duration_s or 0.0))


def clip_id_for(sha256: str, index: int) -> str:
    return f"{sha256[:16]}-{index:03d}"


def ingest_video(path: Path, sha256: str, cfg: IngestConfig, workspace: Workspace | Path) -> IngestResult:
    """Probe, validate and normalise one file into ``workspace/clips/<clip_id>.mp4``.

    Raises OSError (``media.MediaTimeout`` included) when the machine, not the file, failed."""
    path = Path(path)
    try:
        probe = media.probe(path, cfg.probe_timeout_s)
    except media.MediaTimeout:
        raise
    except media.MediaError as exc:
        return IngestResult.failed(exc.reason, str(exc))
    # Claimed sizes and durations only bound the work we accept to do; counts come from the decode.
    width, height = probe.display_size
    if width * height > cfg.max_pixels:
        return IngestResult.failed("too_large", f"{path}: {width}x{height} exceeds {cfg.max_pixels} pixels", probe)
    if probe.duration_s and probe.duration_s > cfg.max_duration_s:
        return IngestResult.failed(
            "too_large", f"{path}: {probe.duration_s:.0f} s exceeds {cfg.max_duration_s:.0f} s", probe
        )
    if width == 0 or height == 0:
        return IngestResult.failed("zero_frames", f"{path}: the video stream has no frame size", probe)
    size = target_size(width, height, cfg.max_side)
    if min(size) < MIN_SIDE_PX:
        message = (
            f"{path}: {width}x{height} pictures would make {size[0]}x{size[1]} clips (max_side {cfg.max_side}), "
            f"under {MIN_SIDE_PX} px on a side"
        )
        return IngestResult.failed("too_small", message, probe)

    ws = Workspace.of(workspace)
    ws.clips.mkdir(parents=True, exist_ok=True)
    staging = temp_path_for(ws.clips / sha256[:16])
    staging.mkdir()
    try:
        return _normalise_and_cut(path, sha256, probe, cfg, size, staging, ws)
    except media.MediaTimeout:
        raise
    except media.MediaError as exc:
        return IngestResult.failed(exc.reason, str(exc), probe)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _normalise_and_cut(path, sha256, probe, cfg, size, staging: Path, ws: Workspace) -> IngestResult:
    encoder = dict(vcodec="libx264", pix_fmt="yuv420p", crf=cfg.crf, preset=cfg.preset)
    gop = max(1, round(cfg.fps * cfg.keyframe_interval_s))
    timeout = _timeout(probe.duration_s, cfg)
    whole = staging / "whole.mp4"
    scores, report = media.normalise(
        path, whole, fps=cfg.fps, size=size, gop=gop, timeout=timeout, crf=cfg.crf, preset=cfg.preset
    )
    num_frames = len(scores)
    decode = dict(num_frames=num_frames, damaged_frames=report.damaged_frames)
    problem = _decode_problem(probe, num_frames / cfg.fps, report)
    if problem:
        reason = "zero_frames" if num_frames == 0 and not report.errors else "undecodable"
        return IngestResult.failed(reason, f"{path}: {problem}", probe, **decode)
    if num_frames < cfg.min_clip_s * cfg.fps - 1e-6:
        message = f"{path}: {num_frames} frames at {cfg.fps:g} fps is shorter than {cfg.min_clip_s} s"
        return IngestResult.failed("too_short", message, probe, **decode)

    needs_split = any(scores[1:] > cfg.scene_threshold) or num_frames > cfg.max_clip_s * cfg.fps
    keyframes = media.keyframes(whole, cfg.fps) if needs_split else set()
    intervals = plan_clips(scores, cfg.fps, cfg, keyframes)
    if not any(keep for _, _, keep in intervals):
        return IngestResult.failed("too_short", f"{path}: no scene lasts {cfg.min_clip_s} s", probe, **decode)
    if len(intervals) == 1:
        segments = [whole]
    else:
        cuts = [start for start, _, _ in intervals[1:]]
        on_keyframes = all(cut in keyframes for cut in cuts)
        media.split(
            whole, staging / "%04d.mp4", cuts, cfg.fps, reencode=None if on_keyframes else encoder, timeout=timeout
        )
        segments = sorted(staging.glob("[0-9]*.mp4"))
    assert len(segments) == len(intervals), f"{path}: {len(segments)} segments for {len(intervals)} intervals"

    records: list[ClipRecord] = []
    for segment, (start, end, keep) in zip(segments, intervals):
        if not keep:
            continue
        clip_id = clip_id_for(sha256, len(records))
        count, width, height = media.count_and_check_frames(segment)
        assert count == end - start, f"{path}: clip {clip_id} has {count} frames, planned {end - start}"
        final = ws.clip_file(clip_id)
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
                path=ws.relative(final),
                sha256=sha256_file(segment),
                size_bytes=segment.stat().st_size,
            )
        )
        publish(segment, final)
    _remove_outdated_clips(ws.clips, sha256, {r.clip_id for r in records})
    return IngestResult(status=VideoStatus.ok, probe=probe, clips=tuple(records), **decode)


def _decode_problem(probe: ProbeInfo, decoded_s: float, report: media.DecodeReport) -> str | None:
    """Why a full decode rejects the file (see the decode policy above), or None."""
    first = report.errors[0] if report.errors else "no message"
    if decoded_s == 0:
        return f"no frame could be decoded ({first})" if report.errors else "the video stream has no frames"
    if not report.errors and not report.damaged_frames:
        return None  # a clean decode; shorter than the container claims is the decode's truth
    if probe.duration_s and decoded_s < 0.9 * probe.duration_s - 0.1:
        what = f"decoded only {decoded_s:.2f} s of the {probe.duration_s:.2f} s it claims, the file is truncated or corrupt"
    else:
        damaged = report.damaged_frames
        what = f"{damaged} damaged frame(s) in the decode" if damaged else "the decode reported errors"
    return f"{what} ({first}); only a clean decode is accepted"


def _remove_outdated_clips(clips_dir: Path, sha256: str, current: set[str]) -> None:
    """Clips of this source from an earlier configuration that no longer exist in this one."""
    for old in clips_dir.glob(f"{sha256[:16]}-*.mp4"):
        if old.stem not in current:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def video_record(
    found: FoundFile,
    sha256: str | None,
    result: IngestResult | None,
    duplicate_of: str | None = None,
    folder: str | None = None,
) -> VideoRecord:
    """The manifest row of one input file (a duplicate's facts are its original's row)."""
    fields: dict = dict(path=os.fspath(found.path), folder=folder, size_bytes=found.size_bytes, sha256=sha256)
    if found.reason is not None:
        fields.update(status=VideoStatus.failed, reason=found.reason, error=found.error)
    elif duplicate_of is not None:
        fields.update(status=VideoStatus.duplicate, duplicate_of=duplicate_of)
    elif result is not None:
        fields.update(status=result.status, reason=result.reason, error=result.error, num_clips=len(result.clips))
        fields.update(num_frames=result.num_frames, damaged_frames=result.damaged_frames)
        if result.probe is not None:
            probe = result.probe.model_dump()
            fields.update(probe, claimed_frames=probe.pop("num_frames"), num_frames=result.num_frames)
    return VideoRecord(**fields)


# ---- the manifests: a workspace grows --------------------------------------------------
#
# manifests/videos.parquet lists every file of every folder ever ingested, one row per path;
# a rerun updates the rows of the files it finds and keeps the others. Content decides: a
# file whose content is already listed under another path is a duplicate of it (its clips
# are that path's), whichever folder it came from. Each content has one primary row (ok or
# failed); clips.parquet holds the clips of every primary that is ok. Rows leave only
# through remove_sources, and a content whose primary goes (removed, or changed in place)
# passes to a remaining duplicate with its clips.


@contextlib.contextmanager
def manifest_lock(workspace: Workspace | Path) -> Iterator[None]:
    """Serialise read-merge-write of the manifests between processes of this host."""
    with exclusive_lock(Workspace.of(workspace).manifests_lock):
        yield


# The columns of schema version 1 (before folders, claimed and damaged frames were recorded).
_V1_ADDED = ("folder", "claimed_frames", "damaged_frames")


def read_videos_manifest(path: Path) -> list[VideoRecord]:
    """The videos manifest; [] when there is none. A version-1 file is read as version 2
    (its ``num_frames`` was the container's claim); any other mismatch raises SchemaError."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        return read_records(path, VideoRecord)
    except SchemaError:
        table = pq.read_table(path)
        v1 = [n for n in VideoRecord.model_fields if n not in _V1_ADDED]
        if (table.schema.metadata or {}).get(b"multianimate.schema_version") != b"1" or table.schema.names != v1:
            raise
    rows = []
    for row in table.to_pylist():
        rows.append(VideoRecord(**row | dict(claimed_frames=row["num_frames"], num_frames=None)))
    return rows


def read_clips_manifest(path: Path) -> list[ClipRecord]:
    return read_records(path, ClipRecord) if Path(path).exists() else []


def settled_sources(earlier: Iterable[VideoRecord], scanned: dict[str, str | None]) -> dict[str, str]:
    """Content hash -> listed path, for content listed earlier under a path this scan did not
    find (``scanned``: path -> content hash) whose verdict stands: the scan's copies of it are
    duplicates. A passing failure is no verdict: such content is processed again."""
    settled: dict[str, str] = {}
    for row in earlier:
        if (
            row.sha256
            and row.status != VideoStatus.duplicate
            and row.reason not in PASSING_REASONS
            and row.path not in scanned
        ):
            settled.setdefault(row.sha256, row.path)
    return settled


def merge_manifests(
    earlier: list[VideoRecord],
    earlier_clips: list[ClipRecord],
    scanned: list[VideoRecord],
    new_clips: dict[str, tuple[ClipRecord, ...]],
) -> tuple[list[VideoRecord], list[ClipRecord]]:
    """The manifests after a run: ``scanned`` rows replace the rows of their paths, the others
    stay; ``new_clips`` (by content hash) replace those of their content."""
    rows = {r.path: r for r in earlier}
    gone = [rows[r.path] for r in scanned if r.path in rows and rows[r.path].sha256 != r.sha256]
    rows |= {r.path: r for r in scanned}
    return _settle(rows, gone, {r.path for r in scanned}, earlier_clips, new_clips)


def _as_duplicate(row: VideoRecord, of: str) -> VideoRecord:
    return VideoRecord(
        path=row.path,
        folder=row.folder,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        status=VideoStatus.duplicate,
        duplicate_of=of,
    )


def _settle(
    rows: dict[str, VideoRecord],
    gone: list[VideoRecord],
    fresh: set[str],
    clips: list[ClipRecord],
    new_clips: dict[str, tuple[ClipRecord, ...]],
) -> tuple[list[VideoRecord], list[ClipRecord]]:
    """One primary row per content, its duplicates pointing at it, and the clips of the
    primaries that are ok (source_path = the primary's path)."""
    by_sha: dict[str, list[VideoRecord]] = {}
    for row in rows.values():
        if row.sha256:
            by_sha.setdefault(row.sha256, []).append(row)
    lost = {g.sha256: g for g in gone if g.sha256 and g.status != VideoStatus.duplicate}
    primary: dict[str, VideoRecord] = {}
    for sha, group in by_sha.items():
        # Two runs may both have processed one content: a verdict first, then this run's, then by path.
        heads = sorted(
            (r for r in group if r.status != VideoStatus.duplicate),
            key=lambda r: (r.reason in PASSING_REASONS, r.path not in fresh, r.path),
        )
        if heads:
            head = heads[0]
        elif sha in lost:  # its primary left: the first remaining copy inherits its verdict
            heir = min(group, key=lambda r: r.path)
            heir_fields = dict(path=heir.path, folder=heir.folder, size_bytes=heir.size_bytes, duplicate_of=None)
            head = lost[sha].model_copy(update=heir_fields)
        else:
            continue  # duplicates of a primary that is not listed (an edited manifest): left as they are
        primary[sha] = rows[head.path] = head
        for row in group:
            if row.path != head.path and (row.status != VideoStatus.duplicate or row.duplicate_of != head.path):
                rows[row.path] = _as_duplicate(row, head.path)
    by_source: dict[str, list[ClipRecord]] = {}
    for clip in clips:
        by_source.setdefault(clip.source_sha256, []).append(clip)
    by_source |= {sha: list(c) for sha, c in new_clips.items()}
    merged = [
        c.model_copy(update={"source_path": head.path})
        for sha, head in sorted(primary.items(), key=lambda item: item[1].path)
        if head.status == VideoStatus.ok
        for c in sorted(by_source.get(sha, []), key=lambda c: c.clip_index)
    ]
    return sorted(rows.values(), key=lambda r: r.path), merged


@dataclass
class Removal:
    """What ``remove_sources`` takes out of a workspace (or would, on a dry run)."""

    rows: list[VideoRecord]  # manifest rows removed
    clips: list[ClipRecord]  # clips no listed file holds any more: rows and files removed
    inherited: dict[str, str] = field(default_factory=dict)  # removed primary path -> copy that keeps its content
    files: list[Path] = field(default_factory=list)  # clip, pose and mask files deleted


def _under(path: str, targets: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip(os.sep) + os.sep) for t in targets)


def remove_sources(workspace: Workspace | Path, targets: list[Path], dry_run: bool = False) -> Removal:
    """Take the files at or under ``targets`` (as ingest listed them) out of the workspace:
    their manifest rows, and the clips (manifest rows, clip, pose and mask files) of the
    content no remaining file holds. Content a remaining duplicate holds stays, under it.
    Manifests are rewritten first, files deleted after: a kill in between leaves unlisted
    files only. Shards made earlier keep their samples until they are made again."""
    ws = Workspace.of(workspace)
    wanted = [os.path.abspath(t) for t in targets]
    with manifest_lock(ws):
        rows = read_videos_manifest(ws.videos_manifest)
        clips = read_clips_manifest(ws.clips_manifest)
        removed = [r for r in rows if _under(r.path, wanted)]
        kept = {r.path: r for r in rows if not _under(r.path, wanted)}
        new_rows, new_clips = _settle(kept, removed, set(), clips, {})
        keep_ids = {c.clip_id for c in new_clips}
        removal = Removal(rows=removed, clips=[c for c in clips if c.clip_id not in keep_ids])
        heads = {r.sha256: r.path for r in new_rows if r.sha256 and r.status != VideoStatus.duplicate}
        removal.inherited = {
            r.path: heads[r.sha256] for r in removed if r.status != VideoStatus.duplicate and r.sha256 in heads
        }
        if dry_run or not removed:
            return removal
        gone_ids = {c.clip_id for c in removal.clips}
        write_records(new_rows, VideoRecord, ws.videos_manifest)
        write_records(new_clips, ClipRecord, ws.clips_manifest)
        files = [ws.resolve(c.path) for c in removal.clips]
        for manifest, record in ((ws.poses_manifest, PoseRecord), (ws.masks_manifest, MaskRecord)):
            if manifest.exists():
                products = read_records(manifest, record)
                write_records([r for r in products if r.clip_id not in gone_ids], record, manifest)
                files += [ws.resolve(r.path) for r in products if r.clip_id in gone_ids]
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removal.files.append(path)
    return removal
