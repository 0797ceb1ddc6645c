"""The shard stage: clips + poses + masks -> WebDataset tar shards and their index.parquet.

Shards are byte-identical for identical inputs: samples sorted by key, members sorted by
name, fixed tar header fields (mtime 0, uid/gid 0, no user names, mode 0644) and npz
members with a fixed zip timestamp. The split is by source video, so no source is on both
sides.

The tars and their index are one unit, published at once (a set published member by member
disagrees with its index after a failure, and training globs whatever tars it finds):

1. the whole set is written into a temporary folder ``shard-sets/.set.tmp-<host>-<pid>-<rand>``;
2. it is renamed ``shard-sets/<set id>`` when whole (id: a digest of every byte of the set,
   so an identical set is never written twice);
3. ``shards`` (the path every reader uses) is a relative symlink to the current set, swapped
   by one ``os.replace`` of a temporary symlink: a reader sees the old set or the new one,
   never a mix;
4. the sets no longer linked are removed (renamed to a temporary name first, so a killed
   removal leaves nothing that looks like a set).

A failure anywhere (disk full, a kill) leaves the previous set linked and whole; an error
removes its temporary folder at once, a killed writer's is removed by the next run. Steps
2-4 hold a lock (``shard-sets/.lock``) so that one run's clean-up never removes the set
another run is about to link. A workspace whose ``shards`` is still a real folder (made
before shard sets) is migrated at its next publication.

Why a symlink rather than renaming folders: a folder cannot replace a non-empty folder in
one rename, and a symlink swap is atomic on every POSIX file system (network ones included).
A reader that wants one set for a long time resolves the link once (the training loader does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from data_schemas import ClipRecord, PoseRecord, read_records, write_records
from data_schemas.arrays import npz_bytes
from data_schemas.atomic import exclusive_lock, fsync_file, remove_stale_temps, temp_path_for
from data_schemas.config import ShardConfig
from data_schemas.mask import MaskRecord
from data_schemas.quality import ClipQuality
from data_schemas.shard import MEMBERS, NO_MEASURES, ShardSample, ShardSummary, readers_file
from data_schemas.workspace import INDEX, Workspace
from preprocess.media import read_frames
from preprocess.pose.stage import load_poses
from preprocess.segment.stage import load_masks

logger = logging.getLogger(__name__)

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# One sample's records: its clip, the clip's poses and its masks.
SampleRecords = tuple[ClipRecord, PoseRecord, MaskRecord]


def split_of(source_sha256: str, cfg: ShardConfig) -> str:
    """'val' for a reproducible ``val_fraction`` of source videos, else 'train'."""
    draw = int(hashlib.sha256(f"{cfg.seed}:{source_sha256}".encode()).hexdigest()[:16], 16) / 2**64
    return "val" if draw < cfg.val_fraction else "train"


def caption_for(persons: int, cfg: ShardConfig) -> str:
    count = NUMBER_WORDS[persons] if persons < len(NUMBER_WORDS) else str(persons)
    return cfg.caption.format(count=count)


def poses_by_person(poses: Mapping[str, np.ndarray], pose_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pose rows reordered so that row k is person k+1 of the label map, every frame:
    keypoints float32 [T, K, 133, 2] (-1 where person k has no pose) and scores float32
    [T, K, 133], from a poses npz and the masks' ``pose_index`` [T, K] (its first T frames)."""
    pose_index = pose_index.astype(np.int64)
    num_frames, persons = pose_index.shape
    keypoints = np.full((num_frames, persons, 133, 2), -1, np.float32)
    scores = np.zeros((num_frames, persons, 133), np.float32)
    t_idx, k_idx = np.nonzero(pose_index >= 0)
    keypoints[t_idx, k_idx] = poses["keypoints"][t_idx, pose_index[t_idx, k_idx]]
    scores[t_idx, k_idx] = poses["scores"][t_idx, pose_index[t_idx, k_idx]]
    return keypoints, scores


def build_sample(
    workspace: Workspace | Path, clip: ClipRecord, pose: PoseRecord, mask: MaskRecord, cfg: ShardConfig
) -> tuple[dict[str, bytes], dict]:
    """The members of one sample (by extension, in ``MEMBERS`` order) and its metadata."""
    ws = Workspace.of(workspace)
    poses, masks = load_poses(ws.resolve(pose.path)), load_masks(ws.resolve(mask.path))
    keypoints, scores = poses_by_person(poses, masks["pose_index"])
    persons = keypoints.shape[1]
    ok, png = cv2.imencode(".png", np.ascontiguousarray(read_frames(ws.resolve(clip.path), [0])[0][..., ::-1]))
    assert ok
    split = split_of(clip.source_sha256, cfg)
    meta = {
        "clip_id": clip.clip_id,
        "source": clip.source_sha256,
        "fps": clip.fps,
        "width": clip.width,
        "height": clip.height,
        "persons": persons,
        "num_frames": clip.num_frames,
        "split": split,
    }
    caption = caption_for(persons, cfg)
    members = {
        "json": json.dumps(meta, sort_keys=True).encode(),
        "mask.npz": npz_bytes(label_map=masks["label_map"]),
        "mp4": ws.resolve(clip.path).read_bytes(),
        "pose.npz": npz_bytes(keypoints=keypoints, scores=scores),
        "ref.png": png.tobytes(),
        "txt": caption.encode(),
    }
    assert tuple(members) == MEMBERS, f"a sample's members are data_schemas.shard.MEMBERS, not {tuple(members)}"
    return members, meta | {"caption": caption}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def create_file(path: Path) -> BinaryIO:
    """How a file of a new set is opened (``write_shards`` takes another for fault injection)."""
    return open(path, "xb")


class _Sink:
    """The file a tar is written to, hashing what passes (the set id digests every byte)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


class _SplitWriter:
    """Fills ``<split>-%06d.tar`` shards up to a target size inside the set being built."""

    def __init__(self, folder: Path, split: str, target_bytes: int, open_file: Callable[[Path], BinaryIO]):
        self.folder, self.split, self.target, self.open_file = folder, split, target_bytes, open_file
        self.digests: dict[str, str] = {}  # shard name -> sha256, once whole
        self._name: str | None = None
        self._sink: _Sink | None = None
        self._tar: tarfile.TarFile | None = None

    def add(self, key: str, members: dict[str, bytes]) -> tuple[str, int, int]:
        if self._tar is None:
            self._name = f"{self.split}-{len(self.digests):06d}.tar"
            self._sink = _Sink(self.open_file(self.folder / self._name))
            self._tar = tarfile.open(fileobj=self._sink, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]  # noqa: SIM115 - closed when the shard is published
        start = self._tar.offset
        for ext in MEMBERS:  # sorted: the order inside a sample
            _add(self._tar, f"{key}.{ext}", members[ext])
        shard, size = self._name, self._tar.offset - start
        if self._tar.offset >= self.target:
            self.close()
        return shard, start, size  # type: ignore[return-value]

    def close(self) -> None:
        """Finish the open shard: end-of-archive blocks, fsync."""
        if self._tar is not None:
            self._tar.close()
            self._sink.raw.flush()  # type: ignore[union-attr]
            os.fsync(self._sink.raw.fileno())  # type: ignore[union-attr]
            self._sink.raw.close()  # type: ignore[union-attr]
            self.digests[self._name] = self._sink.sha256.hexdigest()  # type: ignore[index,union-attr]
            self._tar = self._sink = None

    def abandon(self) -> None:
        """After an error: release the open file (its folder is removed whole)."""
        if self._sink is not None:
            with contextlib.suppress(OSError):  # a full disk may fail the flush again
                self._sink.raw.close()
            self._tar = self._sink = None


def manifest_records(workspace: Workspace | Path) -> list[SampleRecords]:
    """(clip, poses, masks) of every clip the workspace's manifests list with poses and masks."""
    ws = Workspace.of(workspace)
    poses = {r.clip_id: r for r in read_records(ws.poses_manifest, PoseRecord)}
    masks = {r.clip_id: r for r in read_records(ws.masks_manifest, MaskRecord)}
    clips = read_records(ws.clips_manifest, ClipRecord)
    return [(c, poses[c.clip_id], masks[c.clip_id]) for c in clips if c.clip_id in poses and c.clip_id in masks]


def write_shards(
    workspace: Workspace | Path,
    cfg: ShardConfig,
    records: Iterable[SampleRecords] | None = None,
    *,
    quality: Mapping[str, ClipQuality] | None = None,
    open_file: Callable[[Path], BinaryIO] = create_file,
) -> ShardSummary:
    """Every clip of ``records`` (its clip, poses and masks records; None: those the
    workspace's manifests list) becomes one sample, unless ``cfg.filters`` leave it out by its
    ``quality`` measures (manifests/quality.parquet; None: no measures, no filtering); the set
    is published as one unit (module docstring). ``open_file`` opens each tar of the new set
    for writing."""
    ws = Workspace.of(workspace)
    samples = sorted(manifest_records(ws) if records is None else records, key=lambda r: r[0].clip_id)
    clips = [clip for clip, _, _ in samples]
    poses = {clip.clip_id: pose for clip, pose, _ in samples}
    masks = {clip.clip_id: mask for clip, _, mask in samples}
    left_out: dict[str, int] = {}  # filter -> clips it left out
    if quality is not None:
        reasons = {
            c.clip_id: cfg.filters.reasons(quality[c.clip_id]) if c.clip_id in quality else [NO_MEASURES] for c in clips
        }
        for reason in (r for c in clips for r in reasons[c.clip_id]):
            left_out[reason] = left_out.get(reason, 0) + 1
        dropped = sum(bool(reasons[c.clip_id]) for c in clips)
        clips = [c for c in clips if not reasons[c.clip_id]]
    sets = ws.shard_sets
    sets.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(sets)  # what killed writers left; live writers' folders are spared
    building = temp_path_for(sets / "set")
    building.mkdir()
    writers = {split: _SplitWriter(building, split, cfg.target_shard_bytes, open_file) for split in ("train", "val")}
    index: list[ShardSample] = []
    try:
        for clip in clips:
            members, meta = build_sample(ws, clip, poses[clip.clip_id], masks[clip.clip_id], cfg)
            shard, offset, size = writers[meta["split"]].add(clip.clip_id, members)
            index.append(
                ShardSample(
                    key=clip.clip_id,
                    shard=shard,
                    offset=offset,
                    size_bytes=size,
                    split=meta["split"],
                    source_sha256=clip.source_sha256,
                    num_frames=clip.num_frames,
                    persons=meta["persons"],
                    width=clip.width,
                    height=clip.height,
                    fps=clip.fps,
                    caption=meta["caption"],
                )
            )
        for writer in writers.values():
            writer.close()
        write_records(index, ShardSample, building / INDEX)
        digests = {name: sha for writer in writers.values() for name, sha in writer.digests.items()}
        digests[INDEX] = hashlib.sha256((building / INDEX).read_bytes()).hexdigest()
        set_id = hashlib.sha256(
            "".join(f"{name}:{sha};" for name, sha in sorted(digests.items())).encode()
        ).hexdigest()[:16]
        _fsync_dir(building)
        _publish(ws, building, set_id)
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        shutil.rmtree(building, ignore_errors=True)
        raise
    shards = sorted(name for name in digests if name != INDEX)
    return ShardSummary(
        num_samples=len(index),
        shards=tuple(ws.relative(ws.shards / name) for name in shards),
        num_train=sum(s.split == "train" for s in index),
        num_val=sum(s.split == "val" for s in index),
        index=str(ws.shards_index),
        set_dir=ws.relative(ws.shard_sets / set_id),
        num_left_out=dropped if quality is not None else 0,
        left_out=left_out,
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the renames still stand
        fsync_file(path)


def _publish(ws: Workspace, building: Path, set_id: str) -> None:
    """Rename the whole set into place, point ``shards`` at it, remove the sets it replaces."""
    sets, link, target = ws.shard_sets, ws.shards, ws.relative(ws.shard_sets / set_id)
    with exclusive_lock(sets / ".lock"):
        try:
            os.rename(building, sets / set_id)
        except OSError as error:
            # The id digests every byte: an existing folder of that name holds this very set.
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(building)
        _fsync_dir(sets)
        legacy = None
        if not (link.is_symlink() and os.readlink(link) == target):
            new_link = temp_path_for(sets / link.name)  # the target is relative to the workspace, where it lands
            os.symlink(target, new_link)
            if link.is_dir() and not link.is_symlink():  # a workspace from before shard sets
                legacy = temp_path_for(sets / "legacy")
                os.rename(link, legacy)  # (killed right here: no link, the new set whole; a rerun links it)
            os.replace(new_link, link)
            _fsync_dir(ws.root)
        replaced = [
            e for e in sorted(sets.iterdir()) if e.name != set_id and not e.name.startswith(".")
        ]  # dot: lock, temporaries
        for entry in replaced + ([legacy] if legacy is not None else []):
            _remove_set(entry)


def _remove_set(folder: Path) -> None:
    # Renamed to a temporary name first: a killed removal leaves a temporary (removed by the
    # next run), never a partial folder under a set's name. The new set is already published:
    # a failure here costs space, not consistency. A set a training run still reads (a shared
    # lock on its readers file) stays until a later publication finds it free.
    readers = readers_file(folder)
    with open(readers, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("kept the replaced shard set %s: a run still reads it; a later publication removes it", folder)
            return
        _remove_unread_set(folder)
        readers.unlink(missing_ok=True)


def _remove_unread_set(folder: Path) -> None:
    try:
        doomed = folder if folder.name.startswith(".") else temp_path_for(folder)
        if doomed != folder:
            os.rename(folder, doomed)
        shutil.rmtree(doomed)
    except OSError as error:
        logger.warning("could not remove the replaced shard set %s: %s", folder, error)


def verify_shard_set(folder: Path) -> list[str]:
    """What is wrong with a published shard set (``workspace/shards`` or one set folder), as
    sentences naming the file; empty when every index row points at its whole sample in its
    tar, every tar sample is indexed once, every tar ends properly and no other tar is there."""
    folder = Path(folder)
    try:
        rows = read_records(folder / INDEX, ShardSample)
    except (OSError, ValueError) as error:
        return [f"{folder / INDEX}: {error}"]
    problems: list[str] = []
    by_shard: dict[str, list[ShardSample]] = {}
    for row in rows:
        by_shard.setdefault(row.shard, []).append(row)
    tars = sorted(p.name for p in folder.glob("*.tar"))
    for name in sorted(set(tars) - set(by_shard)):
        problems.append(f"{folder / name}: a shard the index does not list")
    for name, shard_rows in sorted(by_shard.items()):
        path = folder / name
        if name not in tars:
            problems.append(f"{path}: listed by the index ({len(shard_rows)} sample(s)) but missing")
            continue
        try:
            with tarfile.open(path, "r:") as tar:
                members = [(m.name, m.offset, m.offset_data + m.size) for m in tar]
        except (OSError, tarfile.TarError) as error:
            problems.append(f"{path}: unreadable tar ({error})")
            continue
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 1024))
            if size < 1024 or any(fh.read(1024)):
                problems.append(f"{path}: no end-of-archive blocks (truncated)")
        if any(end > size for _, _, end in members):
            problems.append(f"{path}: a member runs past the end of the file")
        names = [n for n, _, _ in members]
        expected = [f"{row.key}.{ext}" for row in shard_rows for ext in MEMBERS]
        if names != expected:
            problems.append(f"{path}: holds members {names[:8]}..., its index rows say {expected[:8]}...")
            continue
        for i, row in enumerate(shard_rows):
            sample = members[i * len(MEMBERS) : (i + 1) * len(MEMBERS)]
            start, end = sample[0][1], tarfile.BLOCKSIZE * -(-sample[-1][2] // tarfile.BLOCKSIZE)
            if (start, end - start) != (row.offset, row.size_bytes):
                problems.append(
                    f"{path}: sample {row.key} is at byte {start} ({end - start} bytes), the index says {row.offset} ({row.size_bytes})"
                )
    return problems
