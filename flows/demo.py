"""The demo: the whole DAG on generated sample data, tiny models, CPU.

sample videos -> ingest -> pose -> segment -> shards -> embeddings -> a short 2-process
training run -> a generation job driven by a new synthetic video -> mp4 and preview.

Pose and segmentation run with the truth models by default (``models="truth"``,
preprocess/truth.py): the generator's exact poses and masks through the stages' own code,
so the contact sheet, the overlays and the training data mean something. ``models="tiny"``
runs the random-weight DWPose and SAM2 instead: the real code path, labels that mean
nothing. The generation job is driven by the new video's ground-truth poses and masks and
the reference image's ground-truth poses: the job route a user takes with poses extracted
elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
from prefect import flow
from pydantic import BaseModel, ConfigDict

from data_schemas import ProjectConfig
from data_schemas.embedding import EmbeddingSummary
from data_schemas.job import GenerateSummary, JobSpec, submit_job
from data_schemas.model import ModelConfig
from data_schemas.pose import PreprocessSummary
from data_schemas.train import TrainConfig, TrainResult
from flows.embed import embed
from flows.generate import generate
from flows.preprocess import preprocess
from flows.train import train
from preprocess.synthetic import SyntheticSpec, render_clip, write_ground_truth_stage_files, write_video
from tasks.samples import make_sample_videos

SAMPLES_DIR = "samples/raw"
DRIVING_DIR = "samples/driving"
REFERENCE_DIR = "samples/reference"


class DemoSummary(BaseModel):
    """What each stage of the demo produced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preprocess: PreprocessSummary
    embeddings: EmbeddingSummary
    training: TrainResult
    generation: GenerateSummary
    job_id: str


def driving_inputs(workspace: Path, seed: int, size: int, num_frames: int) -> tuple[Path, Path, Path, Path]:
    """A new two-person synthetic video (+ its ground-truth poses and masks) and a reference
    image of two other persons (+ its ground-truth poses)."""
    drive = render_clip(SyntheticSpec(width=size, height=size, num_frames=num_frames, num_persons=2, seed=seed * 1000 + 901))
    write_video(drive.frames, workspace / DRIVING_DIR / "driving.mp4", fps=25.0)
    poses, masks = write_ground_truth_stage_files(drive, workspace / DRIVING_DIR)
    ref = render_clip(SyntheticSpec(width=size, height=size, num_frames=1, num_persons=2, seed=seed * 1000 + 902))
    (workspace / REFERENCE_DIR).mkdir(parents=True, exist_ok=True)
    reference = workspace / REFERENCE_DIR / "reference.png"
    cv2.imwrite(str(reference), ref.frames[0][..., ::-1])
    ref_poses, _ = write_ground_truth_stage_files(ref, workspace / REFERENCE_DIR)
    return reference, ref_poses, poses, masks


@flow(name="demo")
def demo(workspace: Path, num_videos: int = 4, seed: int = 0, num_frames: int = 75, train_steps: int = 4, nproc: int = 2,
         models: Literal["truth", "tiny"] = "truth") -> DemoSummary:  # fmt: skip
    """Generate sample videos under the workspace and run every stage on them."""
    workspace = Path(workspace).absolute()
    samples = workspace / SAMPLES_DIR
    make_sample_videos(samples, num_videos, seed, num_frames)
    # the built-in defaults (tiny models), with the truth models for pose and segmentation
    config = ProjectConfig.model_validate({"pose": {"models": models}, "segment": {"models": models}})
    prep = preprocess(samples, workspace, config)
    embeddings = embed(workspace, config.model.profile, config.model.wan_folder)
    # a checkpoint midway, so that a demo killed while training resumes; one kept is enough here
    training = train(TrainConfig(workspace=workspace, run_name="demo", model=config.model, num_frames=9, height=64, width=64,
                                 max_steps=train_steps, checkpoint_every=max(1, train_steps // 2), keep_checkpoints=1,
                                 nproc=nproc, num_workers=0, seed=seed))  # fmt: skip
    reference, ref_poses, poses, masks = driving_inputs(workspace, seed, size=128, num_frames=40)
    job = JobSpec(reference=reference, reference_poses=ref_poses, poses=poses, masks=masks, steps=4, num_frames=17,
                  height=64, width=64, fps=15.0, seed=seed, model=ModelConfig(multianimate=training.final_weights))  # fmt: skip
    submit_job(workspace, job)
    generation = generate(workspace, config)
    return DemoSummary(preprocess=prep, embeddings=embeddings, training=training, generation=generation, job_id=job.job_id)
