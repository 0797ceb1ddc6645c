"""Prefect task of the shard stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.shard
from data_schemas.config import ShardConfig
from data_schemas.quality import ClipQuality
from data_schemas.shard import ShardSummary
from preprocess import shards
from tasks.common import code_version, retry_transient

SHARDS_CODE = code_version(shards, data_schemas.shard)


def shards_recipe(config: ShardConfig) -> str:
    """What decides a set's bytes besides its clips: the shard config and our code."""
    return f"{config.digest()}-{SHARDS_CODE}"


def _shards_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # inputs: a digest of the content of every clip, poses and masks of ``records``, made by the flow.
    return f"shards-{parameters['inputs']}-{shards_recipe(parameters['config'])}"


@task(
    name="write-shards",
    cache_key_fn=_shards_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def write_shards(
    workspace: Path,
    config: ShardConfig,
    inputs: str,
    records: list[shards.SampleRecords],
    quality: dict[str, ClipQuality] | None = None,
) -> ShardSummary:
    """All samples of ``records`` (clip, poses, masks) the filters keep into WebDataset shards
    (see preprocess.shards); a set already published from the same inputs (the one the flow
    wrote as clips finished) is kept."""
    summary = shards.write_shards(workspace, config, records, quality=quality, recipe=shards_recipe(config))
    get_run_logger().info(
        "%d sample(s) in %d shard(s): %d train, %d val; published as %s; %d clip(s) left out by the filters %s",
        summary.num_samples,
        len(summary.shards),
        summary.num_train,
        summary.num_val,
        summary.set_dir,
        summary.num_left_out,
        summary.left_out or "",
    )
    if quality is not None:
        rows = "".join(f"| {reason} | {count} |\n" for reason, count in sorted(summary.left_out.items()))
        create_markdown_artifact(
            key="shards",
            description="What the quality filters left out",
            markdown=(
                f"**{summary.num_samples}** sample(s) in the shards ({summary.num_train} train, {summary.num_val} val); "
                f"**{summary.num_left_out}** clip(s) left out (a clip counts under every filter it fails).\n\n"
                f"| filter | clips left out |\n| --- | --- |\n{rows}\nFilters: `{config.filters.model_dump(exclude_none=True)}`\n"
            ),
        )
    return summary
