"""Sample data for the demo: synthetic multi-person videos."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from preprocess import synthetic


@task(name="make-sample-videos", retries=1)
def make_sample_videos(folder: Path, num_videos: int, seed: int, num_frames: int) -> list[Path]:
    """Write ``num_videos`` synthetic videos (and their ground truth) into ``folder``.

    Not cached: generation is deterministic and takes seconds, and identical bytes hit
    the ingest cache downstream anyway.
    """
    return synthetic.make_sample_folder(folder, num_videos=num_videos, seed=seed, num_frames=num_frames)
