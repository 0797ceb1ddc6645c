"""Prefect task that runs one training run under torchrun and streams its log."""

from __future__ import annotations

import csv
import subprocess

from prefect import task
from prefect.logging import get_run_logger

from data_schemas.atomic import atomic_path
from data_schemas.train import TrainConfig, TrainResult
from model.train import latest_checkpoint, launch_command


@task(name="torchrun-train", tags=["gpu"], retries=2, retry_delay_seconds=2)
def run_training(config: TrainConfig) -> TrainResult:
    """Launch ``model.train`` with torchrun; a failed attempt raises, and the retry resumes
    from the run's last complete checkpoint (model.train does that by itself)."""
    logger = get_run_logger()
    run_dir = config.run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "launch.json") as tmp:
        tmp.write_text(config.model_dump_json(indent=2))
    resume = latest_checkpoint(run_dir)
    logger.info("torchrun with %d process(es)%s", config.nproc, f", resuming from {resume.name}" if resume else "")
    cmd = launch_command(run_dir / "launch.json", config.nproc)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line and not line.startswith("*****"):
                logger.info("%s", line)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode} (run {run_dir}); a retry resumes from the last checkpoint")
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    return TrainResult(
        run_dir=run_dir, final_weights=run_dir / "final", loss_curve=run_dir / "loss_curve.png",
        steps=int(last["step"]), final_loss=float(last["loss"]),
        mean_step_time_s=sum(float(r["step_time_s"]) for r in rows) / len(rows),
        samples_per_s=float(last["samples_per_s"]), peak_mem_gib=max(float(r["peak_mem_gib"]) for r in rows),
    )  # fmt: skip
