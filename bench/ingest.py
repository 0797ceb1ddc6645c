"""Ingest against the floor of its work: a plain ffmpeg transcode of the same files.

Both sides normalise the same synthetic videos to the same fps, size and encoder
settings, with the same number of files in flight at once. The ingest side also probes,
hashes, test-decodes, detects scenes, checks clips with decord and runs under Prefect
(after one warm-up flow run, so the one-off start of Prefect's local API is not counted).

    python bench/ingest.py [--videos 12] [--seconds 8] [--size 832x480]

Headline figures, printed last: ingest_vs_ffmpeg (goal <= 1.3), rerun_vs_first (goal <= 0.05).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_videos(folder: Path, count: int, seconds: float, width: int, height: int) -> list[Path]:
    from preprocess.synthetic import SyntheticSpec, make_synthetic_video

    fps = 30.0  # differs from the clip rate, so both sides resample
    specs = [
        SyntheticSpec(width=width, height=height, fps=fps, num_frames=int(seconds * fps), num_persons=1 + i % 3, seed=i)
        for i in range(count)
    ]
    return [make_synthetic_video(spec, folder, f"video_{i:02d}")[0] for i, spec in enumerate(specs)]


def ffmpeg_floor(videos: list[Path], out: Path, cfg, workers: int) -> float:
    """The same normalisation as ingest, as one plain ffmpeg command per file."""
    from preprocess.media import probe
    from preprocess.video import target_size

    out.mkdir(parents=True, exist_ok=True)

    def one(video: Path) -> None:
        width, height = target_size(*probe(video, 30).display_size, cfg.max_side)
        subprocess.run(
            [
                "ffmpeg",
                "-nostdin",
                "-v",
                "error",
                "-y",
                "-i",
                str(video),
                "-an",
                "-vf",
                f"fps={cfg.fps},scale={width}:{height}:flags=bicubic,setsar=1",
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-crf",
                str(cfg.crf),
                "-preset",
                cfg.preset,
                "-movflags",
                "+faststart",
                str(out / video.name),
            ],
            check=True,
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, videos))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    from flows.runtime import make_task_runner, use_workspace

    use_workspace(root / "workspace")
    from data_schemas import IngestConfig
    from flows.ingest import ingest

    cfg = IngestConfig()
    try:
        videos = make_videos(root / "videos", args.videos, args.seconds, width, height)
        warm = root / "warm"
        make_videos(warm, 1, 1.0, 64, 48)
        flow = ingest.with_options(task_runner=make_task_runner(max_workers=args.workers))
        flow(warm, root / "warm-workspace", cfg)  # Prefect's one-off start-up

        floor_s = ffmpeg_floor(videos, root / "floor", cfg, args.workers)
        start = time.perf_counter()
        summary = flow(root / "videos", root / "workspace", cfg)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        flow(root / "videos", root / "workspace", cfg)
        rerun_s = time.perf_counter() - start
        assert summary.num_ok == args.videos, summary

        frames = int(args.videos * args.seconds * cfg.fps)
        print(
            f"videos: {args.videos} x {args.seconds:g} s at {width}x{height}, {frames} output frames, {args.workers} at a time"
        )
        print(f"ffmpeg_floor_s: {floor_s:.2f}")
        print(f"ingest_first_s: {first_s:.2f}")
        print(f"ingest_rerun_s: {rerun_s:.3f}")
        print(f"ingest_vs_ffmpeg: {first_s / floor_s:.3f}")
        print(f"rerun_vs_first: {rerun_s / first_s:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
