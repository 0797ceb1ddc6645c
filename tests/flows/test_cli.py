"""The command line as users run it: separate processes, their own Prefect home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_schemas import ClipRecord, VideoRecord, read_records
from data_schemas.mask import MaskRecord
from data_schemas.shard import ShardSample
from data_schemas.workspace import Workspace
from preprocess import media
from preprocess.synthetic import SyntheticSpec, make_synthetic_video
from tests.helpers.cli import cli_env, temp_files

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "flows.cli"]


def test_sigkill_mid_run_then_rerun_completes_cleanly(tmp_path):
    folder, workspace = tmp_path / "in", tmp_path / "ws"
    for i in range(6):
        make_synthetic_video(
            SyntheticSpec(width=320, height=240, num_frames=100, num_persons=2, seed=i), folder, f"v{i}"
        )
    args = [*CLI, "ingest", str(folder), "--workspace", str(workspace), "--workers", "2"]
    proc = subprocess.Popen(
        args, env=cli_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    clips_dir = Workspace(workspace).clips
    deadline = time.monotonic() + 120
    while not (clips_dir.exists() and any(clips_dir.iterdir())):  # first staging dir or clip
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "ingest never started writing clips"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its ffmpeg children, mid-write
    proc.wait()
    assert not Workspace(workspace).videos_manifest.exists(), "the run finished before the kill"
    assert temp_files(workspace), "the kill should have interrupted a clip being written"

    done = subprocess.run(args, env=cli_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert temp_files(workspace) == []
    videos = read_records(Workspace(workspace).videos_manifest, VideoRecord)
    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    assert [v.status.value for v in videos] == ["ok"] * 6 and len(clips) == 6
    for clip in clips:
        assert media.count_and_check_frames(workspace / clip.path) == (clip.num_frames, clip.width, clip.height)
        assert clip.num_frames == 100
    assert sorted(p.name for p in clips_dir.iterdir()) == sorted(Path(c.path).name for c in clips)
    for result in Workspace(workspace).results.iterdir():
        json.loads(result.read_bytes())  # Prefect's own result files are whole too


def test_demo_produces_the_documented_files(tmp_path):
    workspace = tmp_path / "ws"
    done = subprocess.run(
        [*CLI, "demo", "--workspace", str(workspace)], env=cli_env(), capture_output=True, timeout=900
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    produced = {p.relative_to(workspace).as_posix() for p in workspace.rglob("*") if p.is_file()}
    # Prefect's home and results, the workspace lock, the generation jobs' claim files
    hidden = {p for p in produced if p.startswith(".")}
    assert all(p.startswith((".prefect/", ".claims/")) or p == ".lock" for p in hidden), hidden  # no tiny ONNX files
    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    samples = {f"samples/raw/sample_{i:02d}.{ext}" for i in range(4) for ext in ("mp4", "gt.npz")}
    manifests = {f"manifests/{name}.parquet" for name in ("videos", "clips", "poses", "masks", "quality")} | {
        "manifests/.lock"
    }
    per_clip = {f"{stage}/{c.clip_id}.npz" for c in clips for stage in ("poses", "masks")}
    reports = {"reports/pose-contact-sheet.png", "reports/mask-overlays.png", "reports/data-card.md"}
    reports |= {p for p in produced if p.startswith("reports/data-card/") and p.endswith(".png")}
    current = os.readlink(Workspace(workspace).shards)  # the link to the current shard set
    shards = {p for p in produced if p.startswith(f"{current}/") and p.endswith(".tar")}
    assert shards and {p.split("/")[-1].split("-")[0] for p in shards} <= {"train", "val"}
    embeddings = {p for p in produced if p.startswith("embeddings/") and p.endswith(".safetensors")}
    assert len(embeddings) >= 2  # the captions and the negative prompt
    job_ids = [p.name.removesuffix(".json") for p in Workspace(workspace).queue.iterdir()]
    assert len(job_ids) == 1
    job = f"outputs/{job_ids[0]}"
    run = "runs/demo"
    training = {
        f"{run}/{name}"
        for name in (
            "config.json",
            "launch.json",
            "metrics.csv",
            "loss_curve.png",
            "final/adapter.safetensors",
            "final/config.json",
            "pids/rank0.pid",
            "pids/rank1.pid",
        )
    }
    training |= {
        f"{run}/checkpoints/step-0000004/{name}"
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.json")
    }
    generation = {f"queue/{job_ids[0]}.json"} | {
        f"{job}/{name}" for name in ("job.json", "video.mp4", "preview.mp4", "preview.png")
    }
    driving = {
        f"samples/{folder}/{name}"
        for folder, names in (
            ("driving", ("driving.mp4", "poses.npz", "masks.npz")),
            ("reference", ("reference.png", "poses.npz", "masks.npz")),
        )
        for name in names
    }
    expected = (
        manifests
        | samples
        | {c.path for c in clips}
        | per_clip
        | reports
        | shards
        | {f"{current}/index.parquet", f"{current}/inputs.json", "shard-sets/.lock"}
    )
    expected |= {f"shard-sets/.{current.split('/')[-1]}.readers"}  # the training run's shared lock on the set it read
    # the lock a generation job holds while it fills the prompt cache
    expected |= embeddings | {"embeddings/index.parquet", "embeddings/.lock"} | training | generation | driving
    assert produced - hidden == expected, (sorted(produced - hidden - expected), sorted(expected - produced))
    frames = media.count_and_check_frames(workspace / job / "video.mp4")[0]
    assert frames == 17
    # Sample 2 has a scene cut: four videos give five clips.
    assert len(clips) == 5 and all(
        v.status == "ok" for v in read_records(Workspace(workspace).videos_manifest, VideoRecord)
    )
    # The truth models: every person of every clip (samples have 1, 2, 3, 1 persons), and
    # the default filters keep the clips of two or more.
    masks = read_records(Workspace(workspace).masks_manifest, MaskRecord)
    assert sorted(m.num_persons for m in masks) == [1, 1, 2, 3, 3] and {m.source for m in masks} == {"truth"}
    assert len(read_records(workspace / current / "index.parquet", ShardSample)) == 3
    for clip in clips:
        assert media.count_and_check_frames(workspace / clip.path)[0] == clip.num_frames > 0
    assert str(workspace) in done.stdout.decode()


def test_bad_arguments_get_clear_errors(tmp_path):
    done = subprocess.run(
        [*CLI, "ingest", str(tmp_path / "nowhere"), "-w", str(tmp_path / "ws")], env=cli_env(), capture_output=True
    )
    assert done.returncode != 0 and "nowhere" in done.stderr.decode() and "not a folder" in done.stderr.decode()
    (tmp_path / "bad.yaml").write_text("ingest:\n  fps: -3\n")
    done = subprocess.run(
        [*CLI, "ingest", str(tmp_path), "-w", str(tmp_path / "ws"), "-c", str(tmp_path / "bad.yaml")],
        env=cli_env(),
        capture_output=True,
    )
    assert done.returncode != 0 and "fps" in done.stderr.decode()


def test_weights_verb_names_every_missing_file(tmp_path):
    done = subprocess.run([*CLI, "weights"], env=cli_env(), capture_output=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    repo = Path(__file__).parents[2]
    done = subprocess.run(
        [*CLI, "weights", "-c", str(repo / "configs" / "real.yaml")], env=cli_env(), capture_output=True, cwd=tmp_path
    )
    out = done.stdout.decode()
    assert done.returncode == 1
    for name in (
        "yolox_l.onnx",
        "dw-ll_ucoco_384.onnx",
        "sam2.1-hiera-large",
        "transformer/config.json",
        "vae/config.json",
        "image_encoder/config.json",
        "output_dir/*.safetensors",
        "huggingface-cli download Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    ):
        assert name in out, name
