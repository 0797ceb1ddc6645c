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

from prefect import flow
from pydantic import BaseModel, ConfigDict

from data_schemas import ProjectConfig
from data_schemas.embedding import EmbeddingSummary
from data_schemas.job import GenerateSummary, JobSpec, submit_job
from data_schemas.model import ModelConfig
from data_schemas.pose import PreprocessSummary
from data_schemas.train import LoaderConfig, TrainConfig, TrainResult
from data_schemas.workspace import Workspace
from flows.embed import embed
from flows.generate import generate
from flows.preprocess import preprocess
from flows.train import train
from preprocess.synthetic import write_demo_job_inputs
from tasks.samples import make_sample_videos


class DemoSummary(BaseModel):
    """What each stage of the demo produced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preprocess: PreprocessSummary
    embeddings: EmbeddingSummary
    training: TrainResult
    generation: GenerateSummary
    job_id: str


@flow(name="demo")
def demo(
    workspace: Path,
    num_videos: int = 4,
    seed: int = 0,
    num_frames: int = 75,
    train_steps: int = 4,
    nproc: int = 2,
    models: Literal["truth", "tiny"] = "truth",
) -> DemoSummary:
    """Generate sample videos under the workspace and run every stage on them."""
    workspace = Path(workspace).absolute()
    ws = Workspace(workspace)
    samples = ws.raw_samples
    make_sample_videos(samples, num_videos, seed, num_frames)
    # the built-in defaults (tiny models), with the truth models for pose and segmentation
    config = ProjectConfig.model_validate({"pose": {"models": models}, "segment": {"models": models}})
    prep = preprocess(samples, workspace, config)
    embeddings = embed(workspace, config.model.profile, config.model.wan_folder)
    # a checkpoint midway, so that a demo killed while training resumes; one kept is enough here
    training = train(
        TrainConfig(
            workspace=workspace,
            run_name="demo",
            model=config.model,
            loader=LoaderConfig(num_frames=9, height=64, width=64),
            max_steps=train_steps,
            checkpoint_every=max(1, train_steps // 2),
            keep_checkpoints=1,
            nproc=nproc,
            num_workers=0,
            seed=seed,
        )
    )
    reference, ref_poses, poses, masks = write_demo_job_inputs(ws.samples, seed, size=128, num_frames=40)
    job = JobSpec(
        reference=reference,
        reference_poses=ref_poses,
        poses=poses,
        masks=masks,
        steps=4,
        num_frames=17,
        height=64,
        width=64,
        fps=15.0,
        seed=seed,
        model=ModelConfig(multianimate=training.final_weights),
    )
    submit_job(workspace, job)
    generation = generate(workspace, config)
    return DemoSummary(
        preprocess=prep, embeddings=embeddings, training=training, generation=generation, job_id=job.job_id
    )
