"""Our streaming loader against a faithful re-implementation of the seed's loader.

Both read the same synthetic source clips (200 frames each at the real size, 480x832, with
textured, moving content) and produce the same tensors: 81-frame samples at 480x832 with a
random crop, the video (the seed's float in [-1,1]; ours uint8, which the trainer maps to
[-1,1] on its device, data_schemas/batch.py), pose images and per-person masks / the label map.

* seed: one pickle per video each for frames, pose images and two masks, all JPEG bytes
  (D.7); per sample: unpickle, PIL-decode every frame, pose image and mask of the window,
  crop, resize with torchvision, stack.
* ours: the WebDataset shards of preprocess.shards (the normalised mp4 clip, keypoints and
  the label map), read by model.data: only the window's frames are decoded, pose images
  are rendered on the fly as the seed's were made (drawn at the clip's size, cropped,
  resized), samples are written once into shared memory.

Each loader runs in its own process (same DataLoader worker count) so peak memories are
separate. Headline figures, printed last: speedup_vs_seed (samples/s, ours / seed; goal
>= 5) and disk_ratio (bytes on disk, ours / seed; goal <= 1/3).

    python bench/loader.py [--clips 4] [--samples 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEIGHT, WIDTH, NUM_FRAMES, SOURCE_FRAMES = 480, 832, 81, 200


def build_data(root: Path, num_clips: int) -> None:
    """The same clips twice: as the seed's pickles and as our workspace with shards."""
    import cv2

    from data_schemas import ClipRecord, IngestConfig, PoseRecord, write_records
    from data_schemas.config import SegmentConfig, ShardConfig
    from data_schemas.mask import MaskRecord
    from data_schemas.workspace import Workspace
    from preprocess.media import write_video
    from preprocess.pose.convert import wholebody_to_openpose
    from preprocess.pose.render import draw_pose
    from preprocess.segment.ground_truth import GroundTruthSegmenter
    from preprocess.segment.stage import segment_clip
    from preprocess.shards import write_shards
    from preprocess.synthetic import SyntheticSpec, ground_truth_poses, render_clip
    from preprocess.video import ingest_video, sha256_file

    workspace = root / "ours"
    ws = Workspace(workspace)
    clips, poses, masks = [], [], []
    for i in range(num_clips):
        spec = SyntheticSpec(
            width=WIDTH, height=HEIGHT, num_frames=SOURCE_FRAMES, num_persons=2, seed=i, motions=("dance", "walk")
        )
        clip = render_clip(spec)
        arrays, _ = ground_truth_poses(clip, seed=i)
        # The seed's layout: JPEG bytes of every frame, pose image and person mask, pickled per video.
        seed_dir = root / "seed" / f"video{i}"
        seed_dir.mkdir(parents=True)
        jpeg = lambda image: cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        keys = [f"{t:06d}.jpg" for t in range(SOURCE_FRAMES)]
        frames = {k: jpeg(clip.frames[t][..., ::-1]) for t, k in enumerate(keys)}
        pose_images = {}
        for t, k in enumerate(keys):
            n = arrays["num_persons"][t]
            frame = wholebody_to_openpose(arrays["keypoints"][t, :n], arrays["scores"][t, :n], WIDTH, HEIGHT)
            pose_images[k] = jpeg(draw_pose(frame, HEIGHT, WIDTH)[..., ::-1])
        (seed_dir / "frames.pkl").write_bytes(pickle.dumps(frames))
        (seed_dir / "pose.pkl").write_bytes(pickle.dumps(pose_images))
        for p, name in enumerate(("female", "male")):
            mask = {
                k: jpeg(np.repeat(clip.masks[t, p][..., None].astype(np.uint8) * 255, 3, axis=2))
                for t, k in enumerate(keys)
            }
            (seed_dir / f"mask_{name}.pkl").write_bytes(pickle.dumps(mask))
        # Ours: ingest's normalised clip, the poses, ground-truth masks, then the shards.
        raw = write_video(clip.frames, root / "raw" / f"video{i}.mp4", fps=25.0)
        sha = sha256_file(raw)
        result = ingest_video(raw, sha, IngestConfig(max_side=WIDTH, max_clip_s=60), workspace)
        (record,) = result.clips
        clips.append(record)
        pose_path = ws.pose_file(record.clip_id)
        pose_path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        pose_path.write_bytes(buffer.getvalue())
        poses.append(
            PoseRecord(
                clip_id=record.clip_id,
                path=ws.relative(pose_path),
                sha256=sha,
                num_frames=SOURCE_FRAMES,
                width=WIDTH,
                height=HEIGHT,
                max_persons=2,
                frames_with_persons=SOURCE_FRAMES,
                frames_over_limit=0,
                models="ground-truth",
                provider="none",
            )
        )
        masks.append(
            segment_clip(
                workspace / record.path,
                record.clip_id,
                pose_path,
                lambda c=clip: GroundTruthSegmenter(c.masks),
                "ground-truth",
                SegmentConfig(),
                workspace,
            )
        )
    write_records(clips, ClipRecord, ws.clips_manifest)
    write_records(poses, PoseRecord, ws.poses_manifest)
    write_records(masks, MaskRecord, ws.masks_manifest)
    write_shards(workspace, ShardConfig(val_fraction=0.0, target_shard_bytes=64 * 2**20))


class SeedDataset:
    """The seed's per-sample work (D.5, D.7), re-implemented: unpickle, decode, crop, resize."""

    def __init__(self, folders: list[Path], length: int):
        self.folders, self.length = folders, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch
        from PIL import Image
        from torchvision.transforms import functional as F

        rng = np.random.default_rng(index)
        folder = self.folders[index % len(self.folders)]
        frames = pickle.loads((folder / "frames.pkl").read_bytes())
        poses = pickle.loads((folder / "pose.pkl").read_bytes())
        masks = [pickle.loads(p.read_bytes()) for p in sorted(folder.glob("mask_*.pkl"))]
        keys = list(frames)
        start = int(rng.integers(0, max(1, len(keys) - NUM_FRAMES - 5)))
        window = keys[start : start + NUM_FRAMES]
        window += [window[-1]] * (NUM_FRAMES - len(window))
        width, height = Image.open(io.BytesIO(frames[keys[0]])).size
        left, right = rng.integers(0, width // 14 + 1, 2)
        top, bottom = rng.integers(0, height // 14 + 1, 2)
        box = (int(left), int(top), int(width - right), int(height - bottom))

        def load(data: bytes, mode: str):
            image = Image.open(io.BytesIO(data)).convert(mode).crop(box)
            return F.resize(F.pil_to_tensor(image), [HEIGHT, WIDTH], antialias=True)

        video = torch.stack([load(frames[k], "RGB") for k in window], dim=1).float() / 127.5 - 1
        pose = torch.stack([load(poses[k], "RGB") for k in window], dim=1)
        person_masks = torch.stack([torch.stack([load(m[k], "L")[0] for k in window]) for m in masks])
        return {"video": video, "pose": pose, "masks": person_masks, "ref_image": video[:, 0], "ref_pose": pose[:, 0]}


def child(kind: str, root: Path, samples: int, workers: int) -> dict:
    import torch

    if kind == "seed":
        folders = sorted((root / "seed").iterdir())
        loader = torch.utils.data.DataLoader(SeedDataset(folders, samples + 2), batch_size=1, num_workers=workers)
    else:
        from data_schemas.workspace import Workspace
        from model.data import LoaderConfig, make_loader

        urls = [str(p) for p in sorted(Workspace(root / "ours").shards.glob("train-*.tar"))]
        cfg = LoaderConfig(num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, resampled=True, seed=0)
        loader = make_loader(urls, cfg, batch_size=1, num_workers=workers)
    iterator = iter(loader)
    next(iterator), next(iterator)  # warm-up: worker start, first decode
    start = time.perf_counter()
    for _ in range(samples):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    shapes = {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
    del iterator, loader
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the
    # parent's peak (the data build) instead of this loader's.
    status = Path("/proc/self/status").read_text().splitlines()
    own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"samples_per_s": samples / elapsed, "peak_mb": own, "worker_peak_mb": workers_peak, "shapes": shapes}


def main() -> None:
    from data_schemas.workspace import Workspace  # after the sys.path line above

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", choices=["seed", "ours"])
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.samples, args.workers)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    build_data(root, args.clips)
    results = {}
    for kind in ("seed", "ours"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--root",
                str(root),
                "--samples",
                str(args.samples),
                "--workers",
                str(args.workers),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    disk = {
        kind: sum(p.stat().st_size for p in folder.rglob(pattern))
        for kind, folder, pattern in (
            ("seed", root / "seed", "*.pkl"),
            ("ours", Workspace(root / "ours").shards, "*.tar"),
        )
    }
    for kind in ("seed", "ours"):
        r = results[kind]
        print(
            f"{kind}: {r['samples_per_s']:.3f} samples/s, peak RSS main {r['peak_mb']:.0f} MB, largest worker {r['worker_peak_mb']:.0f} MB, "
            f"disk {disk[kind] / 2**20:.1f} MB, shapes {r['shapes']}"
        )
    print(f"speedup_vs_seed: {results['ours']['samples_per_s'] / results['seed']['samples_per_s']:.2f}")
    print(f"disk_ratio: {disk['ours'] / disk['seed']:.3f}")


if __name__ == "__main__":
    main()
