"""The path a user takes, on random weights of the REAL architecture (Wan2.1-I2V-14B-720P
configs, depth cut; a released-layout MultiAnimate checkpoint), through the command line:
write the weights, preprocess synthetic clips, cache the prompt embeddings with the real
UMT5 architecture, fine-tune 2 steps on 2 torchrun ranks (gloo, FSDP2, the DiT loaded per
rank from the files, bf16 base, fp32 LoRA) with a rank killed after the first checkpoint and
the retry resuming, then a 2-step guided generation with the fine-tuned weights."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from data_schemas.job import JobSpec, read_record, submit_job
from data_schemas.model import ModelConfig
from data_schemas.workspace import Workspace
from model.train import FAULT_ENV
from preprocess.synthetic import SyntheticSpec, make_synthetic_video, write_demo_job_inputs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]


def cli(*args: str, env: dict | None = None, timeout: float = 900) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base |= {"PYTHONPATH": str(ROOT), "COLUMNS": "400", **(env or {})}
    done = subprocess.run([*CLI, *args], env=base, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def test_the_real_path_on_real_architecture_weights(tmp_path, real_architecture):
    weights, ws = real_architecture[0], tmp_path / "ws"  # written by the command (conftest.py)
    profile = weights / "profile.yaml"
    assert "ok" in cli("weights", "-c", str(profile))

    described = cli("train", "--dry-run", "-c", str(profile), "-w", str(ws))
    assert (
        "trainable: " in described
        and "parameters (float32); frozen: " in described
        and "parameters (bfloat16)" in described
    )
    assert "persons: at most 3 (checkpoint " in described  # the released 4-channel layer, widened for fine-tuning

    for i in range(2):
        make_synthetic_video(
            SyntheticSpec(width=64, height=64, num_frames=30, num_persons=2, seed=i), ws / "raw", f"v{i}"
        )
    # the truth models: labels that mean something, so the default filters (two persons) keep the clips
    truth = yaml.safe_load(profile.read_text()) | {"pose": {"models": "truth"}, "segment": {"models": "truth"}}
    (tmp_path / "truth.yaml").write_text(yaml.safe_dump(truth))
    cli("preprocess", str(ws / "raw"), "-w", str(ws), "-c", str(tmp_path / "truth.yaml"))
    assert list(Workspace(ws).shards.glob("train-*.tar"))
    cli("embed", "-w", str(ws), "-c", str(profile))

    # the last rank kills itself at step 1, after the first checkpoint; the task's retry resumes.
    # 2 gloo ranks on a CPU; on a GPU host one NCCL rank per GPU, at most 2
    nproc = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    cli(
        "train",
        "-w",
        str(ws),
        "-c",
        str(profile),
        "--run-name",
        "real",
        "--steps",
        "2",
        "--nproc",
        str(nproc),
        "--num-frames",
        "5",
        "--height",
        "32",
        "--width",
        "32",
        "--checkpoint-every",
        "1",
        env={FAULT_ENV: f"{nproc - 1}:1"},
    )
    run = Workspace(ws).run("real")
    assert (run / ".fault-fired").is_file()
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(np.isfinite(float(r["loss"])) for r in rows)
    config = json.loads((run / "final" / "config.json").read_text())
    assert (
        config["label_pool"],
        config["lora_rank"],
        config["dit"]["num_attention_heads"] * config["dit"]["attention_head_dim"],
    ) == (8, 128, 5120)
    with safe_open(str(run / "final" / "adapter.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        assert dtypes == {"F32"}
        assert f.get_slice("transformer.blocks.1.attn1.to_q.lora_A.default.weight").get_shape() == [128, 5120]

    tuned = yaml.safe_load(profile.read_text())
    tuned["model"]["multianimate"] = str(run / "final")
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(tuned))
    model = ModelConfig(**tuned["model"])
    reference, ref_poses, poses, masks = write_demo_job_inputs(Workspace(ws).samples, seed=0, size=64, num_frames=12)
    job = JobSpec(
        reference=reference,
        reference_poses=ref_poses,
        poses=poses,
        masks=masks,
        steps=2,
        guidance_scale=1.5,
        num_frames=5,
        height=32,
        width=32,
        fps=15.0,
        model=model,
    )
    job_id, _ = submit_job(ws, job)
    cli("generate", "-w", str(ws), "-c", str(tmp_path / "tuned.yaml"))
    record = read_record(ws, job_id)
    assert record is not None and record.status == "ok", record
    import cv2

    video = cv2.VideoCapture(str(ws / record.outputs["video"]))
    frames = []
    while (ok_frame := video.read())[0]:
        frames.append(ok_frame[1])
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
