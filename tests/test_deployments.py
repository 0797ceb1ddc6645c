"""Deployments as users run them: a real Prefect server (SQLite, 127.0.0.1), `multianimate
deploy` from prefect.yaml, a real process worker, and a training run and a generation run
triggered through the API the way the UI triggers them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import pytest

from data_schemas.job import JobSpec, submit_job
from preprocess.synthetic import SyntheticSpec, render_clip
from tests.test_generate import _driving_files, crafted_pose_config
from tests.test_train import run_config

pytestmark = [pytest.mark.slow, pytest.mark.server]
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, again after a while (a worker ignores the first), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(tmp_path):
    """A Prefect server and the environment of its clients; stopped afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1",
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Prefect server did not become healthy"
            time.sleep(0.5)
        yield {"env": env, "url": f"http://127.0.0.1:{port}", "tmp": tmp_path}
    finally:
        stop(proc)


RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=float(sys.argv[3]))
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def run_deployment(server: dict, name: str, parameters: dict, timeout: float = 300) -> dict:
    """Create a flow run of a deployment through the API (what the UI's Run button does) and
    wait for it to end."""
    done = subprocess.run([sys.executable, "-c", RUN_DEPLOYMENT, name, json.dumps(parameters), str(timeout)],
                          env=server["env"], capture_output=True, text=True, timeout=timeout + 60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_deploy_then_train_and_generate_through_a_worker(server, train_workspace):
    env = server["env"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], env=env, capture_output=True, text=True, cwd=server["tmp"])
    assert done.returncode == 0, done.stdout + done.stderr
    listed = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], env=env, capture_output=True, text=True)
    for name in ("preprocess/preprocess", "embed/embed", "train/train", "generate/generate"):
        assert name in listed.stdout, listed.stdout

    worker_log = (server["tmp"] / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"], env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        config = json.loads(run_config(train_workspace, "from-ui", nproc=1, max_steps=2).model_dump_json())
        result = run_deployment(server, "train/train", {"config": config})
        assert result["state"] == "COMPLETED", (result, (server["tmp"] / "worker.log").read_text()[-4000:])
        assert (train_workspace / "runs" / "from-ui" / "final" / "adapter.safetensors").is_file()

        ws, inputs = server["tmp"] / "gen-ws", server["tmp"] / "inputs"
        inputs.mkdir()
        poses, masks = _driving_files(inputs, SyntheticSpec(width=64, height=64, num_frames=9, num_persons=2, seed=2))
        reference = inputs / "reference.png"
        cv2.imwrite(str(reference), render_clip(SyntheticSpec(width=64, height=64, num_frames=1, num_persons=2, seed=5)).frames[0][..., ::-1])
        job_id, _ = submit_job(ws, JobSpec(reference=reference, poses=poses, masks=masks, steps=2, num_frames=5, height=64, width=64))
        pose_cfg = crafted_pose_config(server["tmp"] / "models", (64, 64))  # the tiny random models find nobody
        result = run_deployment(server, "generate/generate", {"workspace": str(ws), "config": {"pose": json.loads(pose_cfg.model_dump_json())}})
        assert result["state"] == "COMPLETED", (result, (server["tmp"] / "worker.log").read_text()[-4000:])
        assert sorted(p.name for p in (ws / "outputs" / job_id).iterdir()) == ["job.json", "preview.mp4", "preview.png", "video.mp4"]
    finally:
        stop(worker)
