"""Prefect task of the shard stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.shard
from data_schemas.config import ShardConfig
from data_schemas.shard import ShardSummary
from preprocess import shards
from tasks.common import code_version, retry_transient

SHARDS_CODE = code_version(shards, data_schemas.shard)


def _shards_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # inputs: a digest of every clip's, poses' and masks' content, made by the flow.
    return f"shards-{parameters['inputs']}-{parameters['config'].digest()}-{SHARDS_CODE}"


@task(name="write-shards", cache_key_fn=_shards_cache_key, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def write_shards(workspace: Path, config: ShardConfig, inputs: str) -> ShardSummary:
    """All samples into WebDataset shards (see preprocess.shards)."""
    summary = shards.write_shards(workspace, config)
    get_run_logger().info("%d sample(s) in %d shard(s): %d train, %d val", summary.num_samples, len(summary.shards), summary.num_train, summary.num_val)
    return summary
