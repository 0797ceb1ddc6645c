"""Import the seed's (MultiAnimate's) two data layouts into our workspace.

Layouts read (spec D.7)
-----------------------
* Training: ``processed_data/<video>/frames.pkl``, ``pose.pkl`` and one ``mask_<name>.pkl``
  per person. Each pickle is a dict ``{frame key: encoded image bytes}``. Frames are taken
  in the key order of ``frames.pkl``; the SAME key fetches the pose image and each mask.
  Pickles are code: they are only unpickled with ``trust_pickles=True``.
* Demo: ``<demo>/source_frames/0000.jpg`` (reference image), ``<demo>/pose/*`` per-frame
  pose images (sorted by name) plus ``pose/pose.jpg`` (the reference image's pose), and
  ``<demo>/masks/<person>/`` with one mask file per pose frame, named exactly like it.
  The demo has no RGB driving frames: its clip is the pose sequence itself.

Masks are grayscale images; a pixel is inside when its value is > 127 (RGB masks are
converted to luminance first).

Workspace layout written (every file temp-then-rename; the clip comes last, so a clip's
presence implies its companions exist)
-----------------------------------------------------------------------------------------
* ``clips/<clip_id>.mp4``: the frames (training) or the pose images (demo), H.264 at
  ``fps``; a trailing odd row/column is cropped (yuv420p needs even sizes).
* ``poses/<clip_id>.images.npz``: the pose images exactly as given (their encoded bytes),
  without pickles: ``data`` uint8 [total bytes], ``offsets`` int64 [T+1] (image i is
  ``data[offsets[i]:offsets[i+1]]``), ``names`` unicode [T] (frame keys / file names),
  ``size`` int64 [2] (pose width, height; may differ from the clip size), and for the demo
  layout ``reference`` uint8 (the bytes of ``pose.jpg``).
* ``masks/<clip_id>.npz``: ``label_map`` uint8 [T,H,W] (0 = background, k = person k in
  sorted person-name order, cropped like the clip), ``person_names`` unicode [P],
  ``source`` = "legacy-training" | "legacy-demo". Overlap rule: where masks overlap, the
  LATER person in sorted name order wins (masks are painted in order, each overwriting).
* ``references/<clip_id>.png`` (demo only): ``source_frames/0000.jpg`` decoded to RGB and
  re-encoded losslessly (not cropped; the reference may have any size).

``clip_id`` = ``legacy-`` + the first 16 hex digits of a sha256 over the input files in
sorted relative-path order; each file contributes its relative path, its length and its
bytes (names are included so that renaming a person folder, which changes the labels,
also changes the id).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from data_schemas.atomic import atomic_path
from data_schemas.legacy import LegacyClip
from data_schemas.workspace import Workspace
from preprocess.media import write_video

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
REFERENCE_POSE_NAME = "pose.jpg"
REFERENCE_IMAGE = Path("source_frames") / "0000.jpg"
# Above this many bytes of decoded frames, decode into a disk-backed array instead of RAM
# (training videos may hold up to ~2000 frames).
_MEMMAP_BYTES = 512 * 2**20


class LegacyImportError(ValueError):
    """A legacy folder cannot be imported; the message names the offending file."""


# ----------------------------------------------------------------------------- helpers


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _hash_files(folder: Path, files: Sequence[Path]) -> str:
    """sha256 over (relative path, length, bytes) of each file in sorted relative-path order."""
    digest = hashlib.sha256()
    for rel in sorted(f.relative_to(folder).as_posix() for f in files):
        path = folder / rel
        name = rel.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _decode(data: bytes, mode: str, what: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode encoded image bytes with PIL into ``mode``; check the size (w, h) when given."""
    try:
        with Image.open(BytesIO(data)) as img:
            # The header gives the size without decoding: report a size mismatch as such.
            if size is not None and img.size != size:
                raise LegacyImportError(
                    f"{what}: image is {img.size[0]}x{img.size[1]} but the sequence is {size[0]}x{size[1]}"
                )
            return np.asarray(img.convert(mode))
    except LegacyImportError:
        raise
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, bombs...)
        raise LegacyImportError(f"{what}: cannot be decoded as an image ({type(exc).__name__}: {exc})") from exc


def _image_size(data: bytes, what: str) -> tuple[int, int]:
    """Width and height of an encoded image, checking that it fully decodes."""
    arr = _decode(data, "RGB", what, None)
    return arr.shape[1], arr.shape[0]


class _FrameBuffer:
    """uint8 [T,H,W,3] for decoded frames: in RAM, or in a temp file when large."""

    def __init__(self, shape: tuple[int, int, int, int]):
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if math.prod(shape) > _MEMMAP_BYTES:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="legacy-frames-")
            path = os.path.join(self._tmpdir.name, "frames.npy")
            self.array: np.ndarray = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        else:
            self.array = np.empty(shape, np.uint8)

    def close(self) -> None:
        if self._tmpdir is not None:
            del self.array  # release the memmap before its file goes
            self._tmpdir.cleanup()


def _even(width: int, height: int, what: str) -> tuple[int, int]:
    w, h = width - width % 2, height - height % 2
    if w == 0 or h == 0:
        raise LegacyImportError(f"{what}: image of {width}x{height} is too small for a video")
    return w, h


def _check_keys(expected: Sequence[str], got: Sequence[str], what: str) -> None:
    """Raise when ``got`` is not the same set of frame names as ``expected``."""
    got_set, expected_set = set(got), set(expected)
    missing = [k for k in expected if k not in got_set]
    extra = sorted(got_set - expected_set)
    if missing or extra:

        def listing(label: str, names: Sequence[str]) -> str:
            shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
            return f"{label} {len(names)} ({shown})"

        parts = ([listing("missing", missing)] if missing else []) + ([listing("unexpected", extra)] if extra else [])
        raise LegacyImportError(f"{what}: frame names do not match the pose/frame names: {'; '.join(parts)}")


def _save_npz(path: Path, *, compress: bool, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object stops numpy from appending ".npz"
        (np.savez_compressed if compress else np.savez)(fh, **arrays)


def _pack_images(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), np.uint8)
    return data, offsets


def _check_fps(fps: float) -> None:
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps}")


def _write_outputs(
    workspace: Workspace | Path,
    clip_id: str,
    *,
    kind: Literal["training", "demo"],
    folder: Path,
    frames: np.ndarray,
    label_map: np.ndarray,
    person_names: Sequence[str],
    pose_blobs: Sequence[bytes],
    pose_names: Sequence[str],
    pose_size: tuple[int, int],
    fps: float,
    reference_pose: bytes | None = None,
    reference_image: np.ndarray | None = None,
) -> LegacyClip:
    """Publish masks, poses, reference, then the clip (last: its presence marks completion)."""
    ws = Workspace.of(workspace)
    rel_masks = ws.relative(ws.mask_file(clip_id))
    rel_poses = ws.relative(ws.pose_images_file(clip_id))
    rel_clip = ws.relative(ws.clip_file(clip_id))
    rel_ref = ws.relative(ws.reference_file(clip_id)) if reference_image is not None else None

    _save_npz(
        ws.resolve(rel_masks),
        compress=True,
        label_map=label_map,
        person_names=np.array(list(person_names), dtype=str),
        source=np.array(f"legacy-{kind}"),
    )
    data, offsets = _pack_images(pose_blobs)
    extra = {} if reference_pose is None else {"reference": np.frombuffer(reference_pose, np.uint8)}
    # Encoded images barely compress: store them as they are.
    _save_npz(
        ws.resolve(rel_poses),
        compress=False,
        data=data,
        offsets=offsets,
        names=np.array(list(pose_names), dtype=str),
        size=np.array(pose_size, np.int64),
        **extra,
    )
    if rel_ref is not None:
        with atomic_path(ws.resolve(rel_ref)) as tmp:
            Image.fromarray(reference_image).save(tmp, format="PNG")
    write_video(frames, ws.resolve(rel_clip), fps)

    t, h, w = label_map.shape
    return LegacyClip(
        clip_id=clip_id,
        kind=kind,
        source_folder=os.fspath(folder.absolute()),
        num_frames=t,
        width=w,
        height=h,
        num_persons=len(person_names),
        person_names=tuple(person_names),
        fps=float(fps),
        clip_path=rel_clip,
        poses_path=rel_poses,
        masks_path=rel_masks,
        reference_path=rel_ref,
    )


# ---------------------------------------------------------------------------- training


def _training_files(folder: Path) -> tuple[Path, Path, list[tuple[str, Path]]]:
    """(frames.pkl, pose.pkl, [(person name, mask pickle)] sorted by name); raise if missing."""
    if not folder.is_dir():
        raise LegacyImportError(f"{folder}: not a folder")
    frames, pose = folder / "frames.pkl", folder / "pose.pkl"
    for path in (frames, pose):
        if not path.is_file():
            raise LegacyImportError(f"{path}: missing (a training folder holds frames.pkl, pose.pkl, mask_<name>.pkl)")
    masks = sorted((p.name[len("mask_") : -len(".pkl")], p) for p in folder.glob("mask_*.pkl") if p.is_file())
    if not masks:
        raise LegacyImportError(f"{folder}: no mask_<name>.pkl files (one per person is needed)")
    for name, path in masks:
        if not name:
            raise LegacyImportError(f"{path}: empty person name (expected mask_<name>.pkl)")
    if len(masks) > 255:
        raise LegacyImportError(f"{folder}: {len(masks)} persons do not fit a uint8 label map")
    return frames, pose, masks


def _load_pickle(path: Path) -> dict[str, bytes]:
    """Unpickle a {frame key: encoded image} dict (the caller has opted in to trust it)."""
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except Exception as exc:
        raise LegacyImportError(f"{path}: cannot be unpickled ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise LegacyImportError(f"{path}: expected a dict of frame key -> image bytes, got {type(obj).__name__}")
    out: dict[str, bytes] = {}
    for key, value in obj.items():
        # UniAnimate's packer may have stored cv2.imencode arrays rather than bytes.
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim <= 2:
            value = value.tobytes()
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if not isinstance(value, bytes):
            raise LegacyImportError(f"{path}: value of key {key!r} is {type(value).__name__}, not image bytes")
        name = str(key)
        if name in out:
            raise LegacyImportError(f"{path}: two keys read as the same frame name {name!r}")
        out[name] = value
    return out


def import_training_video(folder: Path, workspace: Path, *, trust_pickles: bool, fps: float = 25.0) -> LegacyClip:
    """Import one ``processed_data/<video>/`` folder (pickles) into ``workspace``.

    Without ``trust_pickles`` nothing is unpickled: a LegacyImportError explains why.
    Frames follow the key order of ``frames.pkl``; pose and masks are fetched by the same
    keys and must hold exactly those keys. Frames and masks must share one size; pose
    images must share one size among themselves (they are stored as given).
    """
    folder = Path(folder)
    _check_fps(fps)
    frames_pkl, pose_pkl, mask_pkls = _training_files(folder)
    if not trust_pickles:
        others = ", ".join(p.name for p in [pose_pkl, *(m for _, m in mask_pkls)])
        raise LegacyImportError(
            f"{frames_pkl}: refusing to unpickle (also {others}): a pickle is code and loading it can run "
            "anything. Pass --trust-pickles (trust_pickles=True) only for data from a trusted source."
        )
    clip_id = "legacy-" + _hash_files(folder, [frames_pkl, pose_pkl, *(m for _, m in mask_pkls)])[:16]

    frame_data = _load_pickle(frames_pkl)
    keys = list(frame_data)
    if not keys:
        raise LegacyImportError(f"{frames_pkl}: zero frames")
    pose_data = _load_pickle(pose_pkl)
    _check_keys(keys, list(pose_data), str(pose_pkl))
    mask_data = []
    for _, path in mask_pkls:
        data = _load_pickle(path)
        _check_keys(keys, list(data), str(path))
        mask_data.append((path, data))

    first = _decode(frame_data[keys[0]], "RGB", f"{frames_pkl} [key {keys[0]!r}]", None)
    size = (first.shape[1], first.shape[0])
    w, h = _even(*size, f"{frames_pkl} [key {keys[0]!r}]")
    pose_size = _image_size(pose_data[keys[0]], f"{pose_pkl} [key {keys[0]!r}]")

    buffer = _FrameBuffer((len(keys), h, w, 3))
    try:
        label_map = np.zeros((len(keys), h, w), np.uint8)
        for t, key in enumerate(keys):
            frame = _decode(frame_data[key], "RGB", f"{frames_pkl} [key {key!r}]", size)
            buffer.array[t] = frame[:h, :w]
            _decode(pose_data[key], "RGB", f"{pose_pkl} [key {key!r}]", pose_size)
            # Painted in sorted name order: where masks overlap the later person wins.
            for label, (path, data) in enumerate(mask_data, start=1):
                mask = _decode(data[key], "L", f"{path} [key {key!r}]", size)[:h, :w] > 127
                label_map[t][mask] = label
        return _write_outputs(
            workspace,
            clip_id,
            kind="training",
            folder=folder,
            frames=buffer.array,
            label_map=label_map,
            person_names=[name for name, _ in mask_pkls],
            pose_blobs=[pose_data[k] for k in keys],
            pose_names=keys,
            pose_size=pose_size,
            fps=fps,
        )
    finally:
        buffer.close()


# -------------------------------------------------------------------------------- demo


def _demo_files(folder: Path) -> tuple[Path, list[Path], Path, list[tuple[str, list[Path]]]]:
    """(reference image, pose frames sorted by name, pose.jpg, [(person, mask files)]).

    Raises LegacyImportError for missing pieces, zero frames or mask names that do not
    match the pose frame names.
    """
    if not folder.is_dir():
        raise LegacyImportError(f"{folder}: not a folder")
    reference = folder / REFERENCE_IMAGE
    if not reference.is_file():
        raise LegacyImportError(f"{reference}: missing (the demo's reference image)")
    pose_dir = folder / "pose"
    if not pose_dir.is_dir():
        raise LegacyImportError(f"{pose_dir}: missing pose folder")
    reference_pose = pose_dir / REFERENCE_POSE_NAME
    if not reference_pose.is_file():
        raise LegacyImportError(f"{reference_pose}: missing (the pose of the reference image)")
    poses = sorted(
        (p for p in pose_dir.iterdir() if _is_image_file(p) and p.name != REFERENCE_POSE_NAME), key=lambda p: p.name
    )
    if not poses:
        raise LegacyImportError(f"{pose_dir}: zero pose frames (only {REFERENCE_POSE_NAME} or no images)")
    mask_dir = folder / "masks"
    if not mask_dir.is_dir():
        raise LegacyImportError(f"{mask_dir}: missing masks folder (one subfolder per person)")
    persons = sorted((p for p in mask_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not persons:
        raise LegacyImportError(f"{mask_dir}: no person subfolders")
    if len(persons) > 255:
        raise LegacyImportError(f"{mask_dir}: {len(persons)} persons do not fit a uint8 label map")
    names = [p.name for p in poses]
    masks = []
    for person in persons:
        files = {p.name: p for p in person.iterdir() if _is_image_file(p)}
        _check_keys(names, list(files), str(person))
        masks.append((person.name, [files[n] for n in names]))
    return reference, poses, reference_pose, masks


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LegacyImportError(f"{path}: cannot be read ({exc})") from exc


def import_demo_folder(folder: Path, workspace: Path, fps: float = 25.0) -> LegacyClip:
    """Import one demo folder (``source_frames/``, ``pose/``, ``masks/<person>/``).

    The clip is the pose sequence (the demo holds no RGB driving frames); pose frames and
    masks must share one size. ``pose.jpg`` is stored as the poses' ``reference`` and the
    reference image as ``references/<clip_id>.png``. No pickles are involved.
    """
    folder = Path(folder)
    _check_fps(fps)
    reference, poses, reference_pose, masks = _demo_files(folder)
    inputs = [reference, reference_pose, *poses, *(f for _, files in masks for f in files)]
    clip_id = "legacy-" + _hash_files(folder, inputs)[:16]

    reference_rgb = _decode(_read(reference), "RGB", str(reference), None)
    reference_pose_bytes = _read(reference_pose)
    _image_size(reference_pose_bytes, str(reference_pose))

    pose_blobs = [_read(p) for p in poses]
    first = _decode(pose_blobs[0], "RGB", str(poses[0]), None)
    size = (first.shape[1], first.shape[0])
    w, h = _even(*size, str(poses[0]))
    buffer = _FrameBuffer((len(poses), h, w, 3))
    try:
        label_map = np.zeros((len(poses), h, w), np.uint8)
        for t, (path, blob) in enumerate(zip(poses, pose_blobs)):
            buffer.array[t] = _decode(blob, "RGB", str(path), size)[:h, :w]
            # Painted in sorted name order: where masks overlap the later person wins.
            for label, (_, files) in enumerate(masks, start=1):
                mask = _decode(_read(files[t]), "L", str(files[t]), size)[:h, :w] > 127
                label_map[t][mask] = label
        return _write_outputs(
            workspace,
            clip_id,
            kind="demo",
            folder=folder,
            frames=buffer.array,
            label_map=label_map,
            person_names=[name for name, _ in masks],
            pose_blobs=pose_blobs,
            pose_names=[p.name for p in poses],
            pose_size=size,
            fps=fps,
            reference_pose=reference_pose_bytes,
            reference_image=reference_rgb,
        )
    finally:
        buffer.close()


# ------------------------------------------------------------------------------ search


def _looks_like_training(folder: Path) -> bool:
    return (
        (folder / "frames.pkl").is_file()
        and (folder / "pose.pkl").is_file()
        and any(p.is_file() for p in folder.glob("mask_*.pkl"))
    )


def _looks_like_demo(folder: Path) -> bool:
    return (folder / REFERENCE_IMAGE).is_file() and (folder / "pose").is_dir() and (folder / "masks").is_dir()


def _walk(root: Path) -> Iterator[Path]:
    yield root
    # followlinks=False (the default) keeps symlink loops out.
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            yield Path(dirpath) / d


def find_legacy(root: Path) -> list[tuple[str, Path]]:
    """Every folder under ``root`` (itself included) that has the shape of a seed layout.

    Returns ``("training" | "demo", folder)`` pairs sorted by (kind, path). Detection looks
    at file names only (nothing is unpickled or decoded); an import may still fail.
    """
    root = Path(root)
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        return found
    for folder in _walk(root):
        if _looks_like_training(folder):
            found.append(("training", folder))
        if _looks_like_demo(folder):
            found.append(("demo", folder))
    return sorted(found, key=lambda item: (item[0], os.fspath(item[1])))
