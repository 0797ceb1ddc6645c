"""Tests for importing the seed's training (pickle) and demo (folder) layouts."""

from __future__ import annotations

import pickle
import shutil
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data_schemas.workspace import Workspace
from preprocess import legacy
from preprocess.legacy import LegacyImportError, find_legacy, import_demo_folder, import_training_video
from preprocess.media import count_and_check_frames, read_frames
from preprocess.synthetic import SyntheticClip, SyntheticSpec, render_clip

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")

# Person names chosen so that sorted order (label order) differs from the synthetic order.
NAMES = ("male", "female")  # synthetic person 0 -> "male", person 1 -> "female"
SORTED = tuple(sorted(NAMES))


@pytest.fixture(scope="module")
def clip() -> SyntheticClip:
    return render_clip(SyntheticSpec(width=64, height=48, num_frames=6, num_persons=2, seed=0))


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _pose_image(t: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Any drawn image: a moving line and dot on black, like a pose render."""
    img = np.zeros((h, w, 3), np.uint8)
    cv2.line(img, (5 + t, 5), (w - 10, h - 5 - t), (255, 0, 0), 3)
    cv2.circle(img, (w // 2, h // 2 + t), 4, (0, 0, 255), -1)
    return img


def _mask_png(mask: np.ndarray) -> bytes:
    return _encode(mask.astype(np.uint8) * 255, "PNG")


def _expected_labels(masks_by_name: dict[str, np.ndarray]) -> np.ndarray:
    """Label map by the documented rule: sorted names, the later person overwrites."""
    first = next(iter(masks_by_name.values()))
    labels = np.zeros(first.shape, np.uint8)
    for k, name in enumerate(sorted(masks_by_name), start=1):
        labels[masks_by_name[name]] = k
    return labels


class _TouchOnLoad:
    """Unpickles to ``data`` but touches ``marker`` on the way: proof that code ran."""

    def __init__(self, marker: Path, data: bytes):
        self.marker, self.data = marker, data

    def __reduce__(self):
        expr = f"(__import__('pathlib').Path({str(self.marker)!r}).touch(), {self.data!r})[1]"
        return (eval, (expr,))


def _make_training(folder: Path, clip: SyntheticClip, marker: Path | None = None) -> dict:
    """Write a processed_data/<video>/ folder; return what was put in it."""
    folder.mkdir(parents=True)
    keys = [f"{t:06d}.jpg" for t in range(len(clip.frames))]
    frames = {k: _encode(clip.frames[t], "JPEG") for t, k in enumerate(keys)}
    poses = {k: _encode(_pose_image(t), "JPEG") for t, k in enumerate(keys)}
    masks = {name: {k: _mask_png(clip.masks[t, p]) for t, k in enumerate(keys)} for p, name in enumerate(NAMES)}
    frames_out: dict = dict(frames)
    if marker is not None:
        frames_out[keys[0]] = _TouchOnLoad(marker, frames[keys[0]])
    (folder / "frames.pkl").write_bytes(pickle.dumps(frames_out))
    # Reversed insertion order: pose and masks are fetched by key, not by position.
    (folder / "pose.pkl").write_bytes(pickle.dumps(dict(reversed(list(poses.items())))))
    for name, data in masks.items():
        (folder / f"mask_{name}.pkl").write_bytes(pickle.dumps(data))
    return {"keys": keys, "frames": frames, "poses": poses, "masks": masks}


def _make_demo(folder: Path, clip: SyntheticClip, *, overlap: bool = True) -> dict:
    """Write a demo folder; masks are dilated so that persons overlap (tests the rule)."""
    (folder / "source_frames").mkdir(parents=True)
    (folder / "pose").mkdir()
    reference = _encode(clip.frames[0], "JPEG")
    (folder / "source_frames" / "0000.jpg").write_bytes(reference)
    names = [f"{t:04d}.png" for t in range(len(clip.frames))]
    poses = {n: _encode(_pose_image(t), "PNG") for t, n in enumerate(names)}
    for n, data in poses.items():
        (folder / "pose" / n).write_bytes(data)
    ref_pose = _encode(_pose_image(9), "JPEG")
    (folder / "pose" / "pose.jpg").write_bytes(ref_pose)
    kernel = np.ones((7, 7), np.uint8)
    masks: dict[str, np.ndarray] = {}
    for p, person in enumerate(NAMES):
        m = clip.masks[:, p]
        if overlap:
            m = np.stack([cv2.dilate(x.astype(np.uint8), kernel) > 0 for x in m])
        masks[person] = m
        (folder / "masks" / person).mkdir(parents=True)
        for t, n in enumerate(names):
            (folder / "masks" / person / n).write_bytes(_mask_png(m[t]))
    return {"names": names, "poses": poses, "reference": reference, "ref_pose": ref_pose, "masks": masks}


def _unpack(npz_path: Path) -> tuple[list[bytes], list[str], dict]:
    with np.load(npz_path, allow_pickle=False) as z:
        data, offsets = z["data"], z["offsets"]
        blobs = [data[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
        return blobs, [str(n) for n in z["names"]], {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------- training


def test_refuses_pickles_without_trust_then_imports_with_trust(tmp_path: Path, clip: SyntheticClip) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "processed_data" / "video_a"
    put = _make_training(folder, clip, marker)
    ws = tmp_path / "ws"

    with pytest.raises(LegacyImportError) as info:
        import_training_video(folder, ws, trust_pickles=False)
    message = str(info.value)
    assert str(folder / "frames.pkl") in message and "--trust-pickles" in message and "trusted source" in message
    assert not marker.exists()  # nothing was unpickled
    assert not ws.exists()

    rec = import_training_video(folder, ws, trust_pickles=True, fps=10.0)
    assert marker.exists()  # the trusted path does unpickle (pickle.load runs the payload)
    assert rec.kind == "training" and rec.clip_id.startswith("legacy-") and len(rec.clip_id) == 7 + 16
    assert (rec.num_frames, rec.width, rec.height, rec.num_persons) == (6, 64, 48, 2)
    assert rec.person_names == SORTED and rec.reference_path is None
    assert sorted(p.relative_to(ws).as_posix() for p in ws.rglob("*") if p.is_file()) == sorted(
        [rec.clip_path, rec.poses_path, rec.masks_path]
    )

    # Clip: right count and size, frames close to the stored JPEGs (H.264 tolerance) and in
    # order (each decoded frame is nearest to its own source frame).
    assert count_and_check_frames(ws / rec.clip_path) == (6, 64, 48)
    decoded = read_frames(ws / rec.clip_path).astype(np.int16)
    sources = np.stack([_decode_rgb(put["frames"][k]) for k in put["keys"]]).astype(np.int16)
    err = np.abs(decoded[:, None] - sources[None]).mean(axis=(2, 3, 4))
    assert np.diag(err).max() < 5.0, err
    np.testing.assert_array_equal(err.argmin(axis=1), np.arange(6))

    # Label map: masks in sorted-name order (female = 1, male = 2).
    with np.load(ws / rec.masks_path, allow_pickle=False) as z:
        assert z["label_map"].dtype == np.uint8 and z["label_map"].shape == (6, 48, 64)
        expected = _expected_labels({name: clip.masks[:, p] for p, name in enumerate(NAMES)})
        np.testing.assert_array_equal(z["label_map"], expected)
        assert tuple(z["person_names"]) == SORTED and str(z["source"]) == "legacy-training"

    # Pose images kept byte for byte, in frames.pkl key order despite pose.pkl's reversed order.
    blobs, names, arrays = _unpack(ws / rec.poses_path)
    assert names == put["keys"] and blobs == [put["poses"][k] for k in put["keys"]]
    assert "reference" not in arrays and tuple(arrays["size"]) == (64, 48)


def test_training_clip_id_is_content_hash(tmp_path: Path, clip: SyntheticClip) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _make_training(a, clip)
    _make_training(b, clip)
    rec_a = import_training_video(a, tmp_path / "ws", trust_pickles=True)
    rec_b = import_training_video(b, tmp_path / "ws", trust_pickles=True)
    assert rec_a.clip_id == rec_b.clip_id  # same content, other folder
    (b / "mask_male.pkl").rename(b / "mask_zed.pkl")  # relabels persons: must change the id
    assert import_training_video(b, tmp_path / "ws", trust_pickles=True).clip_id != rec_a.clip_id


def test_training_odd_size_is_cropped(tmp_path: Path, clip: SyntheticClip, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legacy, "_MEMMAP_BYTES", 0)  # also exercise the disk-backed frame buffer
    folder = tmp_path / "odd"
    folder.mkdir()
    frames = np.pad(clip.frames, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")  # 65x49
    masks = np.pad(clip.masks, ((0, 0), (0, 0), (0, 1), (0, 1)))
    keys = [f"{t:06d}.jpg" for t in range(3)]
    (folder / "frames.pkl").write_bytes(pickle.dumps({k: _encode(frames[t], "PNG") for t, k in enumerate(keys)}))
    poses = {k: _encode(_pose_image(t, 49, 65), "JPEG") for t, k in enumerate(keys)}
    (folder / "pose.pkl").write_bytes(pickle.dumps(poses))
    (folder / "mask_a.pkl").write_bytes(pickle.dumps({k: _mask_png(masks[t, 0]) for t, k in enumerate(keys)}))
    rec = import_training_video(folder, tmp_path / "ws", trust_pickles=True)
    assert (rec.num_frames, rec.width, rec.height) == (3, 64, 48)
    assert count_and_check_frames(tmp_path / "ws" / rec.clip_path) == (3, 64, 48)
    with np.load(tmp_path / "ws" / rec.masks_path) as z:
        np.testing.assert_array_equal(z["label_map"], clip.masks[:3, 0].astype(np.uint8))
    _, _, arrays = _unpack(tmp_path / "ws" / rec.poses_path)
    assert tuple(arrays["size"]) == (65, 49)  # pose images are kept as given, uncropped


def _rewrite(path: Path, change) -> None:
    data = pickle.loads(path.read_bytes())
    change(data)
    path.write_bytes(pickle.dumps(data))


def test_training_errors(tmp_path: Path, clip: SyntheticClip) -> None:
    ws = tmp_path / "ws"

    folder = tmp_path / "mismatch"
    _make_training(folder, clip)
    _rewrite(folder / "mask_female.pkl", lambda d: d.pop("000003.jpg"))
    with pytest.raises(LegacyImportError, match=r"mask_female\.pkl.*do not match.*000003"):
        import_training_video(folder, ws, trust_pickles=True)

    folder = tmp_path / "size"
    _make_training(folder, clip)
    small = _encode(np.zeros((50, 64, 3), np.uint8), "JPEG")
    _rewrite(folder / "frames.pkl", lambda d: d.update({"000002.jpg": small}))
    with pytest.raises(LegacyImportError, match=r"frames\.pkl.*000002.*64x50"):
        import_training_video(folder, ws, trust_pickles=True)

    folder = tmp_path / "broken"
    _make_training(folder, clip)
    _rewrite(folder / "mask_male.pkl", lambda d: d.update({"000001.jpg": b"not an image"}))
    with pytest.raises(LegacyImportError, match=r"mask_male\.pkl.*000001.*cannot be decoded"):
        import_training_video(folder, ws, trust_pickles=True)

    folder = tmp_path / "empty"
    folder.mkdir()
    for name in ("frames.pkl", "pose.pkl", "mask_a.pkl"):
        (folder / name).write_bytes(pickle.dumps({}))
    with pytest.raises(LegacyImportError, match=r"frames\.pkl: zero frames"):
        import_training_video(folder, ws, trust_pickles=True)

    (folder / "pose.pkl").unlink()
    with pytest.raises(LegacyImportError, match=r"pose\.pkl: missing"):
        import_training_video(folder, ws, trust_pickles=False)
    assert not ws.exists()


# -------------------------------------------------------------------------------- demo


def test_demo_import(tmp_path: Path, clip: SyntheticClip) -> None:
    folder = tmp_path / "demo" / "2people"
    put = _make_demo(folder, clip)
    ws = tmp_path / "ws"
    rec = import_demo_folder(folder, ws, fps=12.5)
    assert rec.kind == "demo" and (rec.num_frames, rec.width, rec.height, rec.num_persons) == (6, 64, 48, 2)
    assert rec.person_names == SORTED and rec.reference_path == f"references/{rec.clip_id}.png"
    assert sorted(p.relative_to(ws).as_posix() for p in ws.rglob("*") if p.is_file()) == sorted(
        [rec.clip_path, rec.poses_path, rec.masks_path, rec.reference_path]
    )

    # The clip is the pose sequence (pose.jpg excluded).
    assert count_and_check_frames(ws / rec.clip_path) == (6, 64, 48)
    decoded = read_frames(ws / rec.clip_path).astype(np.int16)
    originals = np.stack([_pose_image(t) for t in range(6)]).astype(np.int16)
    assert np.abs(decoded - originals).mean() < 6.0

    with np.load(ws / rec.masks_path, allow_pickle=False) as z:
        labels = z["label_map"]
        np.testing.assert_array_equal(labels, _expected_labels(put["masks"]))
        assert tuple(z["person_names"]) == SORTED and str(z["source"]) == "legacy-demo"
    both = put["masks"]["female"] & put["masks"]["male"]
    assert both.any() and (labels[both] == 2).all()  # overlap: the later name ("male") wins

    blobs, names, arrays = _unpack(ws / rec.poses_path)
    assert names == put["names"] and blobs == [put["poses"][n] for n in put["names"]]
    assert arrays["reference"].tobytes() == put["ref_pose"]

    with Image.open(ws / rec.reference_path) as img:
        ref = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(ref, _decode_rgb(put["reference"]))  # lossless re-encode

    again = import_demo_folder(folder, tmp_path / "ws2")
    assert again.clip_id == rec.clip_id


def test_demo_errors(tmp_path: Path, clip: SyntheticClip) -> None:
    ws = tmp_path / "ws"

    folder = tmp_path / "mismatch"
    _make_demo(folder, clip, overlap=False)
    (folder / "masks" / "male" / "0004.png").rename(folder / "masks" / "male" / "0004.jpg")
    with pytest.raises(LegacyImportError, match=r"masks/male.*do not match.*0004\.png.*0004\.jpg"):
        import_demo_folder(folder, ws)

    folder = tmp_path / "size"
    _make_demo(folder, clip, overlap=False)
    (folder / "masks" / "female" / "0002.png").write_bytes(_mask_png(np.zeros((48, 60), bool)))
    with pytest.raises(LegacyImportError, match=r"female/0002\.png.*60x48.*64x48"):
        import_demo_folder(folder, ws)

    folder = tmp_path / "broken"
    _make_demo(folder, clip, overlap=False)
    (folder / "pose" / "0001.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(LegacyImportError, match=r"pose/0001\.png.*cannot be decoded"):
        import_demo_folder(folder, ws)

    folder = tmp_path / "nopose"
    _make_demo(folder, clip, overlap=False)
    shutil.rmtree(folder / "pose")
    with pytest.raises(LegacyImportError, match=r"nopose/pose: missing pose folder"):
        import_demo_folder(folder, ws)

    folder = tmp_path / "onlyref"
    _make_demo(folder, clip, overlap=False)
    for p in (folder / "pose").glob("0*.png"):
        p.unlink()
    with pytest.raises(LegacyImportError, match=r"zero pose frames"):
        import_demo_folder(folder, ws)

    folder = tmp_path / "noref"
    _make_demo(folder, clip, overlap=False)
    (folder / "source_frames" / "0000.jpg").unlink()
    with pytest.raises(LegacyImportError, match=r"source_frames/0000\.jpg: missing"):
        import_demo_folder(folder, ws)
    assert not ws.exists()


# ------------------------------------------------------------------------------ search


def test_find_legacy(tmp_path: Path, clip: SyntheticClip) -> None:
    root = tmp_path / "root"
    short = SyntheticClip(
        clip.frames[:2],
        clip.keypoints[:2],
        clip.keypoint_visible[:2],
        clip.masks[:2],
        clip.colours,
        clip.depth_order[:2],
        clip.spec,
    )
    _make_training(root / "processed_data" / "v2", short)
    _make_training(root / "processed_data" / "v1", short)
    _make_demo(root / "demo" / "2people", short, overlap=False)
    (root / "other" / "pose").mkdir(parents=True)  # not a layout
    (root / "processed_data" / "half").mkdir()
    (root / "processed_data" / "half" / "frames.pkl").write_bytes(b"")
    assert find_legacy(root) == [
        ("demo", root / "demo" / "2people"),
        ("training", root / "processed_data" / "v1"),
        ("training", root / "processed_data" / "v2"),
    ]
    assert find_legacy(root / "demo" / "2people") == [("demo", root / "demo" / "2people")]
    assert find_legacy(tmp_path / "absent") == []


@pytest.mark.slow
def test_import_legacy_command_refuses_pickles_unless_trusted(tmp_path: Path, clip: SyntheticClip) -> None:
    """The CLI verb over a root holding both layouts: without --trust-pickles the demo folder
    is imported and the pickled one is refused with the flag named; with it both are."""
    import subprocess
    import sys

    from data_schemas import read_records
    from data_schemas.legacy import LegacyClip
    from tests.helpers.cli import cli_env

    root = tmp_path / "seed"
    _make_training(root / "processed_data" / "video1", clip)
    _make_demo(root / "demo" / "2people", clip)
    command = [sys.executable, "-m", "flows.cli", "import-legacy", str(root), "-w", str(tmp_path / "ws")]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--trust-pickles" in done.stderr and "frames.pkl" in done.stderr
    assert [c.kind for c in read_records(Workspace(tmp_path / "ws").manifest("legacy"), LegacyClip)] == ["demo"]
    done = subprocess.run([*command, "--trust-pickles"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    clips = read_records(Workspace(tmp_path / "ws").manifest("legacy"), LegacyClip)
    assert sorted(c.kind for c in clips) == ["demo", "training"]
    assert all((tmp_path / "ws" / c.masks_path).exists() for c in clips)
