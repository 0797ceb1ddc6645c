"""Prefect task that runs one training run under torchrun and streams its log."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess

from prefect import task
from prefect.logging import get_run_logger

from data_schemas.atomic import atomic_path
from data_schemas.train import TrainConfig, TrainResult
from model.run_folder import RunFolderBusy, own_run_folder
from model.train import FAILURE_PREFIX, disk_full, latest_checkpoint, launch_command
from tasks.common import GPU_TAG


class TrainingFailed(RuntimeError):
    """torchrun failed; ``retryable`` is False where a retry cannot help (a full disk)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a crash (a killed rank: the retry resumes from the last checkpoint); not a run
    folder another run owns, nor a full disk, which 2 s will not change."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, RunFolderBusy) and getattr(exc, "retryable", True)


@task(name="torchrun-train", tags=[GPU_TAG], retries=2, retry_delay_seconds=2, retry_condition_fn=_worth_retrying)
def run_training(config: TrainConfig) -> TrainResult:
    """Launch ``model.train`` with torchrun; a failed attempt raises, and the retry resumes
    from the run's last complete checkpoint (model.train does that by itself). This process
    owns the run folder while torchrun runs (model/run_folder.py): a second run of the
    same folder is refused, and ranks a killed launcher left behind are stopped first."""
    logger = get_run_logger()
    run_dir = config.run_dir.absolute()
    with own_run_folder(run_dir) as launcher_env:
        with atomic_path(run_dir / "launch.json") as tmp:
            tmp.write_text(config.model_dump_json(indent=2))
        resume = latest_checkpoint(run_dir)
        logger.info("torchrun with %d process(es)%s", config.nproc, f", resuming from {resume.name}" if resume else "")
        cmd = launch_command(run_dir / "launch.json", config.nproc)
        failures = []
        with subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=os.environ | launcher_env,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith(FAILURE_PREFIX):
                    with contextlib.suppress(ValueError):  # a line another process broke into is only logged
                        failures.append(json.loads(line.removeprefix(FAILURE_PREFIX)))
                if line and not line.startswith("*****"):
                    logger.info("%s", line)
    if proc.returncode != 0:
        raise _failure(run_dir, proc.returncode, failures)
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    return TrainResult(
        run_dir=run_dir,
        final_weights=run_dir / "final",
        loss_curve=run_dir / "loss_curve.png",
        steps=int(last["step"]),
        final_loss=float(last["loss"]),
        mean_step_time_s=sum(float(r["step_time_s"]) for r in rows) / len(rows),
        samples_per_s=float(last["samples_per_s"]),
        peak_mem_gib=max(float(r["peak_mem_gib"]) for r in rows),
    )


def _failure(run_dir, returncode: int, failures: list[dict]) -> TrainingFailed:
    """One message that names the cause a rank reported (its root cause, e.g. the OSError of a
    full disk under DCP's wrapper), else torchrun's status."""
    resume = latest_checkpoint(run_dir)
    then = f"training resumes from {resume.name}" if resume else "training starts over"
    full = [f for f in failures if disk_full(f.get("errno"))]
    if full:
        return TrainingFailed(
            f"training run {run_dir}: disk full on rank {full[0]['rank']}: {full[0]['error']}; "
            f"free space, then rerun: {then}",
            retryable=False,
        )
    cause = (
        f"rank {failures[0]['rank']}: {failures[0]['error']}"
        if failures
        else f"torchrun exited with status {returncode}"
    )
    return TrainingFailed(f"training run {run_dir} failed: {cause}; a retry or rerun resumes ({then})")
