"""The training loader (model/data.py) on small synthetic shards written here with tarfile.

Shard format as preprocess/shards.py writes it (data_schemas/shard.py): one sample per clip,
members <key>.{json,mask.npz,mp4,pose.npz,ref.png,txt} in sorted order.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_schemas import batch as B
from model.data import (
    SKIP_REASONS,
    LoaderConfig,
    SkipCounter,
    collate_samples,
    crop_resize_keypoints,
    distributed_rank_world,
    draw_crop,
    make_dataset,
    make_loader,
    sample_window,
)
from preprocess.media import read_frames, write_video
from preprocess.pose.convert import wholebody_to_openpose
from preprocess.pose.render import draw_pose
from preprocess.synthetic import OPENPOSE_TO_WHOLEBODY, SyntheticClip, SyntheticSpec, render_clip
from tests.helpers.poses import assert_close, torchvision_resize

SRC_W, SRC_H, FPS = 128, 96, 25.0


@dataclass
class Clip:
    key: str
    clip: SyntheticClip
    mp4: Path
    members: dict[str, bytes]


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _wholebody(clip: SyntheticClip) -> tuple[np.ndarray, np.ndarray]:
    """Pose rows in label order (row p = label p+1): GT joints with score 0.9 when visible."""
    t, p = clip.keypoints.shape[:2]
    keypoints = np.full((t, p, 133, 2), -1, np.float32)
    scores = np.zeros((t, p, 133), np.float32)
    for op, wb in OPENPOSE_TO_WHOLEBODY.items():
        vis = clip.keypoint_visible[:, :, op]
        keypoints[:, :, wb][vis] = clip.keypoints[:, :, op][vis]
        scores[:, :, wb] = np.where(vis, 0.9, 0.0)
    return keypoints, scores


def make_clip(folder: Path, key: str, seed: int, num_frames: int = 20, persons: int = 2) -> Clip:
    spec = SyntheticSpec(width=SRC_W, height=SRC_H, num_frames=num_frames, num_persons=persons, seed=seed, fps=FPS)
    clip = render_clip(spec)
    mp4 = write_video(clip.frames, folder / f"{key}.mp4", FPS)
    keypoints, scores = _wholebody(clip)
    meta = {
        "clip_id": key,
        "source": f"src{seed}",
        "fps": FPS,
        "width": SRC_W,
        "height": SRC_H,
        "persons": persons,
        "num_frames": num_frames,
        "split": "train",
    }
    members = {
        "json": json.dumps(meta, sort_keys=True).encode(),
        "mask.npz": _npz(label_map=clip.label_map()),
        "mp4": mp4.read_bytes(),
        "pose.npz": _npz(keypoints=keypoints, scores=scores),
        "ref.png": b"\x89PNG unused by the loader",
        "txt": f"{persons} person are dancing {key}".encode(),
    }
    return Clip(key, clip, mp4, members)


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[ext]))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("loader")
    (root / "clips").mkdir()
    clips = {f"clip{i:02d}": make_clip(root / "clips", f"clip{i:02d}", seed=i) for i in range(8)}
    clips["short00"] = make_clip(root / "clips", "short00", seed=50, num_frames=6)
    keys = sorted(k for k in clips if k.startswith("clip"))
    shards = [
        write_shard(root / f"train-{i:06d}.tar", [(k, clips[k].members) for k in keys[2 * i : 2 * i + 2]])
        for i in range(4)
    ]
    return {"root": root, "clips": clips, "shards": [str(s) for s in shards]}


def cfg_for(**overrides) -> LoaderConfig:
    fields: dict = {"num_frames": 9, "height": 48, "width": 64, "crop_fraction": 0.0, "shuffle_buffer": 0, "seed": 0}
    fields.update(overrides)
    return LoaderConfig(**fields)


def resize_reference(frames_THWC: np.ndarray, crop: tuple[int, int, int, int], h: int, w: int) -> torch.Tensor:
    x0, y0, x1, y1 = crop
    t = torch.from_numpy(np.ascontiguousarray(frames_THWC[:, y0:y1, x0:x1])).permute(0, 3, 1, 2).float()
    out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return (out / 127.5 - 1).permute(1, 0, 2, 3)  # [3, T, H, W]


# ------------------------------------------------------------------------ config, helpers


def test_config_validation() -> None:
    assert LoaderConfig().num_frames == 81 and (LoaderConfig().height, LoaderConfig().width) == (480, 832)
    with pytest.raises(ValueError, match="4k\\+1"):
        LoaderConfig(num_frames=80)
    with pytest.raises(ValueError, match="divisible by 16"):
        LoaderConfig(height=100)
    with pytest.raises(ValueError, match="divisible by 16"):
        LoaderConfig(width=830)
    with pytest.raises(ValueError):
        LoaderConfig(crop_fraction=0.5)
    with pytest.raises(ValueError):
        LoaderConfig(pose_style="openpose")
    with pytest.raises(ValueError):  # frozen
        LoaderConfig().num_frames = 5  # type: ignore[misc]
    assert all(f.description for f in LoaderConfig.model_fields.values())


def test_sample_window_and_crop() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx, s = sample_window(100, 9, 3, rng)
        assert 1 <= s <= 3 and np.all(np.diff(idx) == s) and idx[0] >= 0 and idx[-1] <= 99
    idx, s = sample_window(6, 9, 4, rng)  # too short: read all, repeat the last
    assert s == 1 and idx.tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5]
    seen = {sample_window(17, 9, 5, rng)[1] for _ in range(50)}  # only strides 1 and 2 fit 17
    assert seen == {1, 2}
    idx, s = sample_window(17, 9, 2, np.random.default_rng(1))
    assert (s == 1 and idx[-1] - idx[0] == 8) or idx.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    # a fixed stride (min = max), and min_stride falling back to the largest that fits
    assert {sample_window(100, 9, 4, rng, min_stride=4)[1] for _ in range(20)} == {4}
    assert {sample_window(17, 9, 4, rng, min_stride=3)[1] for _ in range(20)} == {2}
    # crop: 0..W//14 off each side (seed D.5), never more
    for _ in range(200):
        x0, y0, x1, y1 = draw_crop(832, 480, 1 / 14, rng)
        assert 0 <= x0 <= 59 and 832 - 59 <= x1 <= 832 and 0 <= y0 <= 34 and 480 - 34 <= y1 <= 480
    assert max(draw_crop(14, 14, 1 / 14, np.random.default_rng(i))[0] for i in range(50)) == 1
    # keypoint map: pixel centres map to pixel centres, missing stays missing
    # (crop edges map to output edges: x0 - 0.5 -> -0.5, x1 - 0.5 -> W - 0.5)
    kp = np.array([[9.5, -0.5], [109.5, 99.5], [-1.0, -1.0], [10.0, 20.0]], np.float32)
    out = crop_resize_keypoints(kp, (10, 0, 110, 100), 50, 50)
    assert np.allclose(out[:2], [[-0.5, -0.5], [49.5, 49.5]]) and out[2].tolist() == [-1, -1]
    assert np.allclose(out[3], [-0.25, 9.75])


def test_rank_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed_rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed_rank_world() == (1, 2)
    with pytest.raises(ValueError):
        make_dataset(["x.tar"], cfg_for(), rank=2, world_size=2)
    with pytest.raises(ValueError):
        make_dataset([], cfg_for())


# ------------------------------------------------------------------------ round trip


def test_round_trip(data: dict) -> None:
    cfg = cfg_for()
    ds = make_dataset(data["shards"], cfg, rank=0, world_size=1)
    samples = list(ds)
    assert sorted(s[B.CLIP_ID] for s in samples) == sorted(k for k in data["clips"] if k.startswith("clip"))
    for s in samples:
        c: Clip = data["clips"][s[B.CLIP_ID]]
        assert set(s) == set(B.ALL_KEYS)
        assert s[B.VIDEO].shape == (3, 9, 48, 64) and s[B.VIDEO].dtype == torch.uint8
        assert s[B.POSE].shape == (3, 9, 48, 64) and s[B.POSE].dtype == torch.uint8
        assert s[B.LABELS].shape == (9, 48, 64) and s[B.LABELS].dtype == torch.uint8
        assert s[B.REF_IMAGE].shape == (3, 48, 64) and s[B.REF_POSE].shape == (3, 48, 64)
        assert s[B.VIDEO].dtype == torch.uint8 and s[B.REF_IMAGE].dtype == torch.uint8
        idx = s[B.FRAME_INDICES].numpy()
        assert np.all(np.diff(idx) == 1) and idx[-1] < 20  # stride 1, no padding needed
        assert s[B.CROP_BOX].tolist() == [0, 0, SRC_W, SRC_H]
        # frames = the clip decoded independently at those indices, resized the documented way
        decoded = read_frames(c.mp4)
        ref = resize_reference(decoded[idx], (0, 0, SRC_W, SRC_H), 48, 64)
        assert torch.allclose(B.video_to_model_range(s[B.VIDEO]), ref, atol=2 / 127.5)
        # ... and close to the frames the clip was rendered from (lossy codec)
        src = resize_reference(c.clip.frames[idx], (0, 0, SRC_W, SRC_H), 48, 64)
        assert (B.video_to_model_range(s[B.VIDEO]) - src).abs().mean() * 127.5 < 6
        # labels: exact nearest neighbour (pixel centres): 2x down -> source pixel 2i+1
        labels = c.clip.label_map()[idx][:, 1::2, 1::2]
        assert np.array_equal(s[B.LABELS].numpy(), labels)
        assert torch.equal(s[B.REF_IMAGE], s[B.VIDEO][:, 0]) and torch.equal(s[B.REF_POSE], s[B.POSE][:, 0])
        assert (
            s[B.CAPTION] == c.members["txt"].decode() and s[B.NUM_PERSONS] == json.loads(c.members["json"])["persons"]
        )
        assert s[B.POSE].sum() > 0  # skeletons were drawn
    batch = collate_samples(samples[:3])
    assert batch[B.VIDEO].shape == (3, 3, 9, 48, 64) and batch[B.NUM_PERSONS].tolist() == [2, 2, 2]
    assert batch[B.CLIP_ID] == [s[B.CLIP_ID] for s in samples[:3]]


def test_pose_style_dwpose_renders(data: dict) -> None:
    s = next(iter(make_dataset(data["shards"][0], cfg_for(pose_style="dwpose"), rank=0, world_size=1)))
    assert s[B.POSE].sum() > 0


# ------------------------------------------------------------------------ crop consistency


def test_crop_consistency(data: dict) -> None:
    cfg = cfg_for(height=64, width=96, crop_fraction=0.2, max_stride=2, shuffle_buffer=4, seed=7)
    ds = make_dataset(data["shards"], cfg, rank=0, world_size=1)
    cropped = checked = interior = missed = 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for s in ds:
            c: Clip = data["clips"][s[B.CLIP_ID]]
            crop = tuple(s[B.CROP_BOX].tolist())
            cropped += crop != (0, 0, SRC_W, SRC_H)
            pose = s[B.POSE].numpy().any(axis=0)  # [T, H, W] non-black
            labels = s[B.LABELS].numpy()
            source_labels = c.clip.label_map()
            for t, f in enumerate(s[B.FRAME_INDICES].tolist()):
                kp = crop_resize_keypoints(c.clip.keypoints[f], crop, 96, 64)  # [P, 18, 2]
                for p in range(kp.shape[0]):
                    for j in OPENPOSE_TO_WHOLEBODY:  # the joints that went into the pose npz
                        if not c.clip.keypoint_visible[f, p, j]:
                            continue
                        x, y = np.rint(kp[p, j]).astype(int)
                        if not (0 <= x < 96 and 0 <= y < 64):
                            continue  # cropped away
                        checked += 1
                        win = np.s_[t, max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
                        assert pose[win].any(), (s[B.CLIP_ID], f, p, j)  # a drawn joint is there
                        # A joint inside its person's own pixels (3x3 in the source) lands on them
                        # within 1 px. Any visible joint: within 2 px, allowing rare misses (a 1-px
                        # sliver of an occluded limb may vanish when downscaled).
                        sx, sy = np.rint(c.clip.keypoints[f, p, j]).astype(int)
                        inner = source_labels[f, max(0, sy - 1) : sy + 2, max(0, sx - 1) : sx + 2]
                        if inner.size == 9 and (inner == p + 1).all():
                            near = labels[t, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
                            assert (near == p + 1).any(), (s[B.CLIP_ID], f, p, j, crop)
                            interior += 1
                        missed += not (labels[win] == p + 1).any()
    assert cropped >= 8 and interior > 100 and checked > 500, (cropped, interior, checked)
    assert missed <= 0.02 * checked, (missed, checked)


def _nearest(start: int, length: int, out: int) -> np.ndarray:
    """Source pixels of a nearest-neighbour resize, pixel centres (PIL's NEAREST), written out."""
    return start + np.array([min(int((i + 0.5) * length / out), length - 1) for i in range(out)])


def _check_against_references(s: dict, c: Clip, height: int, width: int, style: str) -> None:
    """Every output against an independent computation from the documented conventions: labels
    by nearest neighbour, pose images as the release made them (drawn at the clip's size,
    cropped, resized by torchvision; tolerance of tests/preprocess/test_pose_scale.py), frames by the
    reference resize (up to the uint8 rounding)."""
    x0, y0, x1, y1 = crop = tuple(s[B.CROP_BOX].tolist())
    idx = s[B.FRAME_INDICES].numpy()
    labels = c.clip.label_map()[idx][:, _nearest(y0, y1 - y0, height)][:, :, _nearest(x0, x1 - x0, width)]
    assert np.array_equal(s[B.LABELS].numpy(), labels)
    keypoints, scores = _wholebody(c.clip)
    for t, f in enumerate(idx):
        drawn = draw_pose(wholebody_to_openpose(keypoints[f], scores[f], SRC_W, SRC_H), SRC_H, SRC_W, style)
        assert_close(s[B.POSE][:, t].permute(1, 2, 0).numpy(), torchvision_resize(drawn[y0:y1, x0:x1], height, width))
    ref = resize_reference(read_frames(c.mp4)[idx], crop, height, width)
    assert torch.allclose(B.video_to_model_range(s[B.VIDEO]), ref, atol=2 / 127.5)
    assert torch.equal(s[B.REF_IMAGE], s[B.VIDEO][:, 0]) and torch.equal(s[B.REF_POSE], s[B.POSE][:, 0])
    for k in (B.VIDEO, B.POSE, B.LABELS):
        assert s[k].is_contiguous()


@pytest.mark.parametrize("style", ["unianimate", "dwpose"])
def test_outputs_match_the_references_under_crop_and_stride(data: dict, style: str) -> None:
    cfg = cfg_for(height=64, width=96, crop_fraction=0.2, max_stride=2, seed=5, pose_style=style)
    cropped = 0
    for s in make_dataset(data["shards"], cfg, rank=0, world_size=1):
        _check_against_references(s, data["clips"][s[B.CLIP_ID]], 64, 96, style)
        cropped += tuple(s[B.CROP_BOX].tolist()) != (0, 0, SRC_W, SRC_H)
    assert cropped >= 4


def test_batches_from_workers(data: dict) -> None:
    # Workers write samples into shared memory (through its file); a batch of one is a view
    # of that, larger batches are stacked into new shared memory: both must carry the very
    # same, correct tensors.
    cfg = cfg_for(crop_fraction=0.1, max_stride=2, seed=2)

    def by_clip(batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
        loader = make_loader(data["shards"], cfg, batch_size=batch_size, num_workers=2, rank=0, world_size=1)
        return {
            cid: {k: batch[k][i] for k in B.TENSOR_KEYS} for batch in loader for i, cid in enumerate(batch[B.CLIP_ID])
        }

    ones, twos = by_clip(1), by_clip(2)
    assert sorted(ones) == sorted(twos) == sorted(k for k in data["clips"] if k.startswith("clip"))
    for cid, sample in ones.items():
        for k in B.TENSOR_KEYS:
            assert torch.equal(sample[k], twos[cid][k]), (cid, k)
        _check_against_references(sample, data["clips"][cid], 48, 64, "unianimate")


# ------------------------------------------------------------------------ padding and stride


def test_padding_short_clip(data: dict, tmp_path: Path) -> None:
    c: Clip = data["clips"]["short00"]
    shard = write_shard(tmp_path / "short-000000.tar", [(c.key, c.members)])
    s = next(iter(make_dataset(str(shard), cfg_for(max_stride=3), rank=0, world_size=1)))
    assert s[B.FRAME_INDICES].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5]
    for t in range(6, 9):
        assert torch.equal(s[B.VIDEO][:, t], s[B.VIDEO][:, 5])
        assert torch.equal(s[B.POSE][:, t], s[B.POSE][:, 5])
        assert torch.equal(s[B.LABELS][t], s[B.LABELS][5])
    ref = resize_reference(read_frames(c.mp4)[[0, 1, 2, 3, 4, 5, 5, 5, 5]], (0, 0, SRC_W, SRC_H), 48, 64)
    assert torch.allclose(B.video_to_model_range(s[B.VIDEO]), ref, atol=2 / 127.5)


def test_stride_picks_every_sth_frame(data: dict) -> None:
    cfg = cfg_for(max_stride=2)  # 20-frame clips: a 9-frame window fits at stride 1 and 2
    ds = make_dataset(data["shards"][:2], cfg, rank=0, world_size=1)
    strides = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for s in ds:
            idx = s[B.FRAME_INDICES].numpy()
            stride = int(idx[1] - idx[0])
            strides.add(stride)
            assert np.all(np.diff(idx) == stride) and idx[-1] < 20
            if stride == 2:
                decoded = read_frames(data["clips"][s[B.CLIP_ID]].mp4)
                start = idx[0]
                ref = resize_reference(decoded[start : start + 17 : 2], (0, 0, SRC_W, SRC_H), 48, 64)
                assert torch.allclose(B.video_to_model_range(s[B.VIDEO]), ref, atol=2 / 127.5)
                labels = data["clips"][s[B.CLIP_ID]].clip.label_map()[start : start + 17 : 2, 1::2, 1::2]
                assert np.array_equal(s[B.LABELS].numpy(), labels)
    assert strides == {1, 2}


def test_epochs_differ_and_seed_reproduces(data: dict) -> None:
    cfg = cfg_for(crop_fraction=1 / 14, shuffle_buffer=8, seed=3)

    def run(epoch: int) -> list[tuple[str, list[int], list[int]]]:
        ds = make_dataset(data["shards"], cfg, rank=0, world_size=1)
        ds.set_epoch(epoch)
        return [(s[B.CLIP_ID], s[B.FRAME_INDICES].tolist(), s[B.CROP_BOX].tolist()) for s in ds]

    assert run(0) == run(0)
    assert run(0) != run(1)


# ------------------------------------------------------------------------ distribution


def test_two_ranks_two_workers_each_sample_once(data: dict) -> None:
    cfg = cfg_for(shuffle_buffer=4, seed=1)
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        loader = make_loader(data["shards"], cfg, batch_size=1, num_workers=2, rank=rank, world_size=2)
        seen[rank] = [cid for batch in loader for cid in batch[B.CLIP_ID]]
    everything = sorted(k for k in data["clips"] if k.startswith("clip"))
    assert sorted(seen[0] + seen[1]) == everything  # each exactly once
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])


def test_rank_from_environment(data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        seen.append({s[B.CLIP_ID] for s in make_dataset(data["shards"], cfg_for())})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_torch_distributed_takes_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert distributed_rank_world() == (0, 1)
    finally:
        torch.distributed.destroy_process_group()


def test_resampled_epoch_samples(data: dict) -> None:
    cfg = cfg_for(resampled=True, shuffle_buffer=2)
    loader = make_loader(data["shards"], cfg, batch_size=2, num_workers=2, epoch_samples=6, rank=0, world_size=1)
    ids = [cid for batch in loader for cid in batch[B.CLIP_ID]]
    assert len(ids) == 6 and set(ids) <= set(data["clips"])


def test_resampled_shard_draws_follow_the_seed(data: dict) -> None:
    # training draws shards with replacement: a resumed run must draw what the first one drew
    # (webdataset's ResampledShards mixes in the time and pid unless told otherwise)
    def run(seed: int, epoch: int) -> list[str]:
        ds = make_dataset(data["shards"], cfg_for(resampled=True, seed=seed), epoch_samples=16, rank=0, world_size=1)
        ds.set_epoch(epoch)
        return [s[B.CLIP_ID] for s in ds]

    first = run(0, 0)
    assert len(first) == 16 and len(set(first)) > 2
    assert run(0, 0) == first
    assert run(0, 1) != first and run(1, 0) != first


# ------------------------------------------------------------------------ corrupt data


@pytest.fixture(scope="module")
def corrupt(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corrupt")
    clips = data["clips"]
    good = write_shard(root / "c-000000.tar", [(k, clips[k].members) for k in ("clip00", "clip01")])
    bad_video = dict(_renamed(clips["clip02"].members, "bvideo"), mp4=b"this is not an mp4" * 50)
    bad_pose = dict(
        _renamed(clips["clip03"].members, "bpose"), **{"pose.npz": clips["clip03"].members["pose.npz"][:100]}
    )
    no_mask = {k: v for k, v in _renamed(clips["clip04"].members, "nomask").items() if k != "mask.npz"}
    bad_mask = dict(_renamed(clips["clip04"].members, "bmask"), **{"mask.npz": b"PK\x03\x04 not a zip"})
    broken = write_shard(
        root / "c-000001.tar",
        [
            ("bvideo", bad_video),
            ("bpose", bad_pose),
            ("nomask", no_mask),
            ("clip05", clips["clip05"].members),
            ("bmask", bad_mask),
        ],
    )
    # A shard cut in the middle of its second sample's mp4.
    full = write_shard(root / "full.tar", [(k, clips[k].members) for k in ("clip06", "clip07")])
    raw = full.read_bytes()
    cut = raw.index(b"clip07.mp4") + 512 + 1000
    truncated = root / "c-000002.tar"
    truncated.write_bytes(raw[:cut])
    full.unlink()
    urls = [str(good), str(broken), str(truncated), str(root / "c-000003.tar")]  # the last one does not exist
    return {"urls": urls, "expect": {"clip00", "clip01", "clip05", "clip06"}}


def _renamed(members: dict[str, bytes], key: str) -> dict[str, bytes]:
    # The json's clip_id must match the new key, or the sample is "inconsistent".
    meta = json.loads(members["json"])
    meta["clip_id"] = key
    return dict(members, json=json.dumps(meta).encode())


def _check_counts(counts: dict[str, int]) -> None:
    assert set(counts) == set(SKIP_REASONS)
    assert counts["bad_video"] == 1 and counts["bad_pose"] == 1 and counts["bad_mask"] == 1
    assert counts["missing_member"] == 2  # the sample without a mask, the stub of the cut one
    # the cut shard (its reader fails, and it lacks the end blocks) and the missing file
    assert counts["shard_error"] >= 2 and counts["truncated_shard"] == 1
    assert counts["inconsistent"] == 0 and counts["bad_meta"] == 0


def test_corrupt_samples_and_truncated_shard_single_process(corrupt: dict) -> None:
    ds = make_dataset(corrupt["urls"], cfg_for(), rank=0, world_size=1)
    got = {s[B.CLIP_ID] for s in ds}
    assert got == corrupt["expect"]
    _check_counts(ds.skips.counts())
    assert ds.skips.samples == 5 and ds.skips.shards >= 3


def test_corrupt_counted_across_workers(corrupt: dict) -> None:
    skips = SkipCounter()
    loader = make_loader(corrupt["urls"], cfg_for(), batch_size=1, num_workers=2, rank=0, world_size=1, skips=skips)
    got = {cid for batch in loader for cid in batch[B.CLIP_ID]}
    assert got == corrupt["expect"]
    assert loader.dataset.skips is skips
    _check_counts(skips.counts())
    skips.reset()
    assert skips.samples == 0


@pytest.mark.slow
def test_corrupt_counted_across_spawned_workers(corrupt: dict) -> None:
    # spawn (used with CUDA) pickles the dataset into fresh processes: the counter must follow.
    loader = make_loader(
        corrupt["urls"], cfg_for(), batch_size=2, num_workers=2, rank=0, world_size=1, multiprocessing_context="spawn"
    )
    got = {cid for batch in loader for cid in batch[B.CLIP_ID]}
    assert got == corrupt["expect"]
    _check_counts(loader.dataset.skips.counts())


# ------------------------------------------------------------------------ real shard writer


def test_reads_what_write_shards_writes(tmp_path: Path) -> None:
    """Integration with preprocess/shards.py (skipped while that stage is unavailable)."""
    try:
        from data_schemas.config import ShardConfig
        from preprocess.shards import write_shards
        from tests.helpers.workspaces import make_workspace
    except ImportError as exn:  # the shard stage is written in parallel
        pytest.skip(f"shard writer not importable: {exn}")
    origins = make_workspace(tmp_path, num_clips=4)
    summary = write_shards(tmp_path, ShardConfig())
    urls = [str(tmp_path / s) for s in summary.shards]
    ds = make_dataset(urls, cfg_for(crop_fraction=1 / 14), rank=0, world_size=1)
    samples = list(ds)
    assert sorted(s[B.CLIP_ID] for s in samples) == sorted(origins)
    assert ds.skips.samples == 0 and ds.skips.shards == 0
    for s in samples:
        assert s[B.VIDEO].shape == (3, 9, 48, 64) and s[B.NUM_PERSONS] == 2 and s[B.POSE].sum() > 0
        assert set(np.unique(s[B.LABELS].numpy())) <= {0, 1, 2}


def test_shard_cut_at_a_member_boundary_is_counted(data: dict, tmp_path: Path) -> None:
    # tarfile reads such a file as a clean, shorter archive: only the missing end blocks tell.
    clips = data["clips"]
    full = write_shard(tmp_path / "full.tar", [(k, clips[k].members) for k in ("clip06", "clip07")])
    raw = full.read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(raw[: raw.index(b"clip07.json")])  # right before the second sample's first header
    ds = make_dataset(str(cut), cfg_for(), rank=0, world_size=1)
    assert [s[B.CLIP_ID] for s in ds] == ["clip06"]
    assert ds.skips.counts()["truncated_shard"] == 1 and ds.skips.samples == 0
