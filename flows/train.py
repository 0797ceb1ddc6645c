"""The train flow: check the inputs, run torchrun (retried, resuming), publish the results."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from data_schemas.train import TrainConfig, TrainResult
from data_schemas.workspace import Workspace
from model.text_cache import captions_from_shards, missing_texts
from model.text_encoder import profile_encoder_id
from model.train import check_inputs
from tasks.reports import inline_image
from tasks.train import run_training


def check_embeddings(config: TrainConfig) -> None:
    """Every caption of the shards must be in the embedding cache (training never loads the
    text encoder): a ValueError names the missing texts and how to fill the cache."""
    ws = Workspace(config.workspace)
    encoder_id = profile_encoder_id(config.model.profile, config.model.wan_folder)
    missing = missing_texts(ws.embeddings, encoder_id, captions_from_shards(ws.shards_index))
    if missing:
        raise ValueError(
            f"{len(missing)} caption(s) have no cached embedding for encoder {encoder_id}, e.g. {missing[0]!r}: "
            f"run the embed flow first (multianimate embed -w {config.workspace})"
        )


@flow(name="train", flow_run_name="train {config.run_name}")
def train(config: TrainConfig = TrainConfig()) -> TrainResult:
    """LoRA fine-tuning of MultiAnimate on the workspace's shards (torchrun, FSDP2)."""
    logger = get_run_logger()
    config = config.model_copy(update={"workspace": Path(config.workspace).absolute()})
    shards = check_inputs(config)  # shards and weights, each missing one named
    check_embeddings(config)
    logger.info(
        "%d shard(s), %d process(es), %d step(s) -> %s", len(shards), config.nproc, config.max_steps, config.run_dir
    )
    result = run_training(config)
    create_table_artifact(
        key="train-metrics",
        table=[
            {
                "run": config.run_name,
                "steps": result.steps,
                "final loss": round(result.final_loss, 5),
                "mean step time (s)": round(result.mean_step_time_s, 3),
                "samples/s": round(result.samples_per_s, 3),
                "peak memory (GiB)": round(result.peak_mem_gib, 3),
            }
        ],
        description=f"training run {config.run_name}",
    )
    create_markdown_artifact(
        key="train-result",
        markdown=(
            f"### Training run `{config.run_name}`\n\nWeights (LoRA + encoders): `{result.final_weights}`  \n"
            f"Metrics: `{result.run_dir / 'metrics.csv'}`\n\n{inline_image(result.loss_curve, 'loss curve', fmt='png')}"
        ),
        description="where the trained weights are, and the loss curve",
    )
    return result
