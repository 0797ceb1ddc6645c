"""The demo: the whole pipeline on generated sample data, tiny models, CPU.

For now: sample videos -> ingest -> pose -> segment -> shards. Each later stage joins this flow as it lands.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data_schemas import ProjectConfig
from data_schemas.pose import PreprocessSummary
from flows.preprocess import preprocess
from tasks.samples import make_sample_videos

SAMPLES_DIR = "samples/raw"


@flow(name="demo")
def demo(workspace: Path, num_videos: int = 4, seed: int = 0, num_frames: int = 75) -> PreprocessSummary:
    """Generate ``num_videos`` synthetic videos under the workspace and run the pipeline on them."""
    workspace = Path(workspace).absolute()
    samples = workspace / SAMPLES_DIR
    make_sample_videos(samples, num_videos, seed, num_frames)
    return preprocess(samples, workspace, ProjectConfig())  # the built-in defaults: tiny models
