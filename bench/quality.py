"""The quality measures' time against the segment stage's, on the same clips (tiny profile).

Each clip is a synthetic video written by preprocess.synthetic.make_synthetic_video (the
demo's frame sizes, two or three persons) with its ground-truth poses in the pose stage's
layout (write_ground_truth_stage_files). On every clip, both timed from its files:

* segment: preprocess.segment.stage.segment_clip with the tiny profile's SAM2
  (sam2_factory(SegmentConfig())): decode, track, assign poses, write masks/<id>.npz;
* measures: preprocess.quality.measure_clip_files on the clip, its poses and the masks the
  segment stage just wrote: decode every frame (in chunks), all measures, the ClipQuality row.

The model is built and both paths run once on a short clip before timing (one-time costs:
model build, first torch and decoder calls). Headline figure, printed last:
quality_vs_segment = sum of the measures' times / sum of the segment stage's times (goal <= 0.1).

    python bench/quality.py [--clips 2] [--frames 25]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ((256, 192), (320, 240), (192, 256), (288, 224))  # the demo's sample sizes


def prepare(folder: Path, name: str, spec) -> tuple[Path, Path]:
    """The clip's video and its ground-truth poses file."""
    from preprocess.synthetic import load_ground_truth, make_synthetic_video, write_ground_truth_stage_files

    video, truth = make_synthetic_video(spec, folder, name)
    poses, _ = write_ground_truth_stage_files(load_ground_truth(truth), folder / f"{name}-truth")
    return video, poses


def run(video: Path, poses: Path, name: str, workspace: Path, factory, source: str) -> tuple[float, float, object]:
    """(segment seconds, measures seconds, the quality row) for one clip."""
    from data_schemas.config import SegmentConfig
    from preprocess.quality import measure_clip_files
    from preprocess.segment.stage import segment_clip

    start = time.perf_counter()
    record = segment_clip(video, name, poses, factory, source, SegmentConfig(), workspace)
    middle = time.perf_counter()
    row = measure_clip_files(name, video, poses, workspace / record.path)
    end = time.perf_counter()
    return middle - start, end - middle, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--frames", type=int, default=25)
    args = parser.parse_args()

    import torch

    from data_schemas.config import SegmentConfig
    from preprocess.segment.stage import sam2_factory
    from preprocess.synthetic import SyntheticSpec

    torch.set_grad_enabled(False)
    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    factory, source = sam2_factory(SegmentConfig())  # builds the tiny model
    warm = prepare(root, "warmup", SyntheticSpec(num_frames=5, seed=99))
    run(*warm, "warmup", root / "ws", factory, source)

    clips = []
    for i in range(args.clips):
        width, height = SIZES[i % len(SIZES)]
        spec = SyntheticSpec(width=width, height=height, num_frames=args.frames, num_persons=2 + i % 2, seed=i)
        clips.append((f"clip{i}", spec, *prepare(root, f"clip{i}", spec)))
    segment_s = measures_s = 0.0
    threads = torch.get_num_threads()
    print(f"tiny profile on the CPU ({threads} torch threads), {args.clips} clips of {args.frames} frames")
    for name, spec, video, poses in clips:
        seg, meas, row = run(video, poses, name, root / "ws", factory, source)
        segment_s, measures_s = segment_s + seg, measures_s + meas
        print(
            f"{name}: {spec.width}x{spec.height}, {spec.num_persons} persons: segment {seg:.2f} s, "
            f"measures {meas:.3f} s ({meas / seg:.4f}); persons tracked {row.num_persons}"
        )
    print(f"segment_s: {segment_s:.2f}")
    print(f"measures_s: {measures_s:.3f}")
    print(f"quality_vs_segment: {measures_s / segment_s:.4f}")


if __name__ == "__main__":
    main()
