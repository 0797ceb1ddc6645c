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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

import cv2
import numpy as np

from data_schemas import ClipRecord, PoseRecord, read_records, write_records
from data_schemas.arrays import npz_bytes
from data_schemas.atomic import atomic_write_bytes, exclusive_lock, fsync_file, remove_stale_temps, temp_path_for
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


# What the published set was built from: its recipe (what besides the clips decides its
# bytes: the shard config and the code, as the caller names them) and, per clip, a digest of
# its records and the filters' verdict. A run whose inputs equal these finds the set there.
INPUTS = "inputs.json"


@dataclass(frozen=True)
class SampleEntry:
    """One clip as the shard set takes it: its records and the filters it fails (empty: kept)."""

    clip: ClipRecord
    pose: PoseRecord
    mask: MaskRecord
    left_out_by: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return hashlib.sha256(
            f"{self.clip.sha256}:{self.pose.sha256}:{self.mask.sha256}:{','.join(self.left_out_by)}".encode()
        ).hexdigest()[:16]


def left_out_by(cfg: ShardConfig, quality: ClipQuality | None) -> tuple[str, ...]:
    """The filters of ``cfg`` a clip with these measures fails (no measures: ``NO_MEASURES``)."""
    return (NO_MEASURES,) if quality is None else tuple(cfg.filters.reasons(quality))


class ShardSetBuilder:
    """A new shard set, built sample by sample in clip-id order (``add``) and published whole
    by ``finish``; ``abandon`` after an error removes what was written. Adding samples as
    their clips finish gives the same bytes as adding them all at the end."""

    def __init__(
        self,
        workspace: Workspace | Path,
        cfg: ShardConfig,
        recipe: str | None = None,
        open_file: Callable[[Path], BinaryIO] = create_file,
    ) -> None:
        self.ws, self.cfg, self.recipe = Workspace.of(workspace), cfg, recipe
        sets = self.ws.shard_sets
        sets.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(sets)  # what killed writers left; live writers' folders are spared
        self.building = temp_path_for(sets / "set")
        self.building.mkdir()
        self._writers = {s: _SplitWriter(self.building, s, cfg.target_shard_bytes, open_file) for s in ("train", "val")}
        self._index: list[ShardSample] = []
        self._entries: dict[str, SampleEntry] = {}

    def add(self, entry: SampleEntry) -> None:
        """The clip's sample (unless a filter leaves it out); clips come in clip-id order."""
        clip = entry.clip
        assert not self._entries or clip.clip_id > next(reversed(self._entries)), "samples come in clip-id order"
        self._entries[clip.clip_id] = entry
        if entry.left_out_by:
            return
        members, meta = build_sample(self.ws, clip, entry.pose, entry.mask, self.cfg)
        shard, offset, size = self._writers[meta["split"]].add(clip.clip_id, members)
        self._index.append(
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

    def finish(self, filtered: bool = True) -> ShardSummary:
        """Close the tars, write the index and the inputs, publish the set (``filtered``:
        count the clips the filters left out)."""
        try:
            for writer in self._writers.values():
                writer.close()
            write_records(self._index, ShardSample, self.building / INDEX)
            atomic_write_bytes(self.building / INPUTS, _inputs_json(self.recipe, self._entries.values()))
            digests = {name: sha for writer in self._writers.values() for name, sha in writer.digests.items()}
            for name in (INDEX, INPUTS):
                digests[name] = hashlib.sha256((self.building / name).read_bytes()).hexdigest()
            set_id = hashlib.sha256(
                "".join(f"{name}:{sha};" for name, sha in sorted(digests.items())).encode()
            ).hexdigest()[:16]
            _fsync_dir(self.building)
            _publish(self.ws, self.building, set_id)
        except BaseException:
            self.abandon()
            raise
        return _summary(self.ws, set_id, self._index, self._entries.values() if filtered else ())

    def abandon(self) -> None:
        for writer in self._writers.values():
            writer.abandon()
        shutil.rmtree(self.building, ignore_errors=True)


def _inputs_json(recipe: str | None, entries: Iterable[SampleEntry]) -> bytes:
    clips = {e.clip.clip_id: [e.digest, list(e.left_out_by)] for e in entries}
    return json.dumps({"recipe": recipe, "clips": clips}, sort_keys=True).encode()


def _summary(ws: Workspace, set_id: str, index: list[ShardSample], entries: Iterable[SampleEntry]) -> ShardSummary:
    left_out: dict[str, int] = {}  # filter -> clips it left out
    dropped = 0
    for entry in entries:
        dropped += bool(entry.left_out_by)
        for reason in entry.left_out_by:
            left_out[reason] = left_out.get(reason, 0) + 1
    return ShardSummary(
        num_samples=len(index),
        shards=tuple(ws.relative(ws.shards / name) for name in sorted({s.shard for s in index})),
        num_train=sum(s.split == "train" for s in index),
        num_val=sum(s.split == "val" for s in index),
        index=str(ws.shards_index),
        set_dir=ws.relative(ws.shard_sets / set_id),
        num_left_out=dropped,
        left_out=left_out,
    )


def published_inputs(workspace: Workspace | Path, recipe: str | None) -> dict[str, str]:
    """Clip id -> sample digest of the published set when it was built by ``recipe``; empty
    when none is published, it was built otherwise, or ``recipe`` is None."""
    if recipe is None:
        return {}
    try:
        inputs = json.loads((Workspace.of(workspace).shards / INPUTS).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(inputs, dict) or inputs.get("recipe") != recipe:
        return {}
    return {clip_id: digest for clip_id, (digest, _) in inputs["clips"].items()}


def _published_summary(ws: Workspace, recipe: str | None, entries: list[SampleEntry]) -> ShardSummary | None:
    """The published set's summary when it was built from exactly ``entries`` by ``recipe``
    and is whole; else None."""
    if recipe is None:  # no recipe, no telling how the published set was built
        return None
    if published_inputs(ws, recipe) != {e.clip.clip_id: e.digest for e in entries} or verify_shard_set(ws.shards):
        return None
    set_dir = ws.shards.resolve()
    return _summary(ws, set_dir.name, read_records(set_dir / INDEX, ShardSample), entries)


def sample_entries(
    records: Iterable[SampleRecords], cfg: ShardConfig, quality: Mapping[str, ClipQuality] | None
) -> list[SampleEntry]:
    """The entries of ``records`` in clip-id order, with the filters' verdicts from
    ``quality`` (None: no measures, no filtering)."""
    return [
        SampleEntry(clip, pose, mask, () if quality is None else left_out_by(cfg, quality.get(clip.clip_id)))
        for clip, pose, mask in sorted(records, key=lambda r: r[0].clip_id)
    ]


def write_shards(
    workspace: Workspace | Path,
    cfg: ShardConfig,
    records: Iterable[SampleRecords] | None = None,
    *,
    quality: Mapping[str, ClipQuality] | None = None,
    recipe: str | None = None,
    open_file: Callable[[Path], BinaryIO] = create_file,
) -> ShardSummary:
    """Every clip of ``records`` (its clip, poses and masks records; None: those the
    workspace's manifests list) becomes one sample, unless ``cfg.filters`` leave it out by its
    ``quality`` measures (manifests/quality.parquet; None: no measures, no filtering); the set
    is published as one unit (module docstring). With a ``recipe`` (what else decides the
    bytes: e.g. the config's and the code's digests), a published set built from the same
    inputs by the same recipe is kept as it is (e.g. the one written as clips finished).
    ``open_file`` opens each tar of the new set for writing."""
    ws = Workspace.of(workspace)
    entries = sample_entries(manifest_records(ws) if records is None else records, cfg, quality)
    published = _published_summary(ws, recipe, entries)
    if published is not None:
        return published if quality is not None else published.model_copy(update={"num_left_out": 0, "left_out": {}})
    builder = ShardSetBuilder(ws, cfg, recipe, open_file)
    try:
        for entry in entries:
            builder.add(entry)
    except BaseException:
        builder.abandon()
        raise
    return builder.finish(filtered=quality is not None)


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


class ShardStream:
    """The samples of a set written as their clips finish rather than after the last one:
    clips are offered in any order (``offer``), held back until every clip before them in
    clip-id order is in (so the bytes are those of ``write_shards``), and written on a thread
    of their own while the stages go on. Writing starts at the first clip whose sample is not
    the published set's (same ``recipe``): a rerun that changes nothing writes nothing, and
    ``finish`` then returns None (``write_shards`` with the same recipe decides). Use as a
    context manager: leaving it on an error removes what was written."""

    def __init__(
        self,
        workspace: Workspace | Path,
        cfg: ShardConfig,
        clip_ids: Iterable[str],
        recipe: str,
        open_file: Callable[[Path], BinaryIO] = create_file,
    ) -> None:
        self.ws, self.cfg, self.recipe, self.open_file = Workspace.of(workspace), cfg, recipe, open_file
        self._order = sorted(clip_ids)
        self._next = 0  # clips of _order released to the writer (or held)
        self._waiting: dict[str, SampleEntry | None] = {}  # offered out of order
        self._held: list[SampleEntry] = []  # released, all the published set's: written only once one differs
        self._published = published_inputs(self.ws, recipe)
        self._builder: ShardSetBuilder | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shards")
        self._error: BaseException | None = None
        self.offered = 0
        self.through_at_first_write: int | None = None  # clips offered when the first sample was written

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            if self._builder is not None:
                self._builder.abandon()

    def offer(self, clip_id: str, entry: SampleEntry | None) -> None:
        """Clip ``clip_id`` is through its stages: ``entry``, or None when it has no sample
        (a stage failed)."""
        self.offered += 1
        self._waiting[clip_id] = entry
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            clip = self._order[self._next]
            self._next += 1
            self._release(clip, self._waiting.pop(clip))

    def _release(self, clip_id: str, entry: SampleEntry | None) -> None:
        if self._builder is None:
            if self._published.get(clip_id) == (entry.digest if entry else None):
                if entry is not None:
                    self._held.append(entry)
                return
            self._builder = ShardSetBuilder(self.ws, self.cfg, self.recipe, self.open_file)
            for held in self._held:
                self._pool.submit(self._write, held)
            self._held = []
        if entry is not None:
            self._pool.submit(self._write, entry)

    def _write(self, entry: SampleEntry) -> None:
        if self._error is not None:
            return
        if self.through_at_first_write is None:
            self.through_at_first_write = self.offered
        try:
            self._builder.add(entry)  # type: ignore[union-attr]
        except BaseException as error:  # raised by finish, in the caller's thread
            self._error = error

    def finish(self) -> ShardSummary | None:
        """Publish the set written (None: nothing was, every clip so far is the published
        set's); raises what writing met, or RuntimeError when clips were never offered."""
        self._pool.shutdown(wait=True)
        if self._builder is None:
            return None
        if self._error is not None or self._next < len(self._order):
            self._builder.abandon()
            if self._error is not None:
                raise self._error
            raise RuntimeError(
                f"{len(self._order) - self._next} clip(s) never came through, e.g. {self._order[self._next]}"
            )
        return self._builder.finish()
