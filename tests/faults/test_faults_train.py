"""Training under faults (issue case 4; checkpoints under a full disk and kills) and crafted
checkpoints (case 6). The injections live in bench/fault_cases/train.py; these tests run them
on real torchrun ranks through the real CLI and assert the details."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fault_cases import train as faults
from data_schemas.workspace import Workspace
from model.run_folder import LAUNCHER_ENV, OWNER_FILE, RunFolderBusy, identity, own_run_folder, process_start
from tests.helpers.models import run_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fault_workspace(train_workspace) -> tuple[Path, Path]:
    """The session's training workspace and an uninterrupted 3-step run on it (the reference;
    its run names are this module's own)."""
    return train_workspace, faults.reference_run(train_workspace)


@pytest.mark.slow
def test_killed_launcher_full_disk_and_kill_in_a_save_each_leave_a_run_that_resumes_to_the_uninterrupted_result(
    fault_workspace, prefect_api
):
    """One run folder through three faults in a row, each followed by the next attempt, as an
    unlucky user would meet them; the last rerun equals the uninterrupted run byte for byte."""
    ws, reference = fault_workspace
    env = faults.base_env(prefect_api)
    cfg = run_config(ws, "three-faults", **faults.RUN)

    # kill -9 of the CLI's process group while the ranks (own sessions) wait after step 1
    assert faults.kill_launcher(cfg, env) == []
    assert faults.checkpoint_problems(cfg.run_dir, [1]) == []

    # the next run's rank 1 finds the disk full inside the step-2 save: it fails once, naming
    # the cause; the partial save is removed, step 1 untouched
    assert faults.fill_disk_in_save(cfg, env) == []
    assert faults.checkpoint_problems(cfg.run_dir, [1]) == []

    # the next run's rank 0 (which owns the folder: torchrun by hand) is killed inside that save
    assert faults.kill_in_save(cfg, env) == []
    assert faults.checkpoint_problems(cfg.run_dir, [1], temporaries=True) == []
    assert (cfg.run_dir / "checkpoints" / ".step-0000002.tmp").is_dir()
    assert not (cfg.run_dir / "checkpoints" / "step-0000002").exists()

    # with space and no fault, the rerun resumes from step 1, removes the partial save, completes
    assert faults.rerun(cfg, env, resume_from=1) == []
    assert faults.product_problems(cfg.run_dir, reference) == []
    assert sorted(p.name for p in (cfg.run_dir / "pids").iterdir()) == ["rank0.pid", "rank1.pid"]


# ---- one writer per run folder ---------------------------------------------------------------


def test_a_run_folder_has_one_owner_and_each_rank_one_process(tmp_path, monkeypatch):
    from model.train import claim_run_folder

    run_dir = Workspace(tmp_path).run("r")
    with own_run_folder(run_dir) as env:
        assert env == {LAUNCHER_ENV: identity()}
        assert (run_dir / OWNER_FILE).read_text().startswith(identity())
        with (
            pytest.raises(RunFolderBusy, match=rf"{run_dir} is in use by another training run \(pid {os.getpid()} on "),
            own_run_folder(run_dir),
        ):
            pass
        # a rank of this launcher claims its pid file; the same rank a second time is refused
        monkeypatch.setenv(LAUNCHER_ENV, env[LAUNCHER_ENV])
        with claim_run_folder(run_dir, 1):
            pid_file = run_dir / "pids" / "rank1.pid"
            assert pid_file.read_text() == f"{identity()}\n"
            with pytest.raises(RunFolderBusy, match=f"rank1.pid is locked by a live process \\(pid {os.getpid()}\\)"):  # noqa: SIM117 - raises wraps the claim alone
                with claim_run_folder(run_dir, 1):
                    pass
            assert pid_file.read_text() == f"{identity()}\n"  # the refused claim wrote nothing
    assert not (run_dir / OWNER_FILE).exists()  # let go: no stale owner named
    with own_run_folder(run_dir):  # and free again
        pass
    # a late rank of a launcher that is gone refuses to start (pid 1's start time is not 0)
    monkeypatch.setenv(LAUNCHER_ENV, "1 0")
    with pytest.raises(RunFolderBusy, match="this rank's launcher \\(pid 1\\) is gone"):  # noqa: SIM117 - raises wraps the claim alone
        with claim_run_folder(run_dir, 0):
            pass


RANK_HELPER = """
import sys, time
from pathlib import Path
from model.run_folder import die_with_launcher, hold_rank
if sys.argv[3] == "watch":
    die_with_launcher()
with hold_rank(Path(sys.argv[1]), int(sys.argv[2])):
    print("claimed", flush=True)
    time.sleep(300)
"""


def start_rank(run_dir: Path, rank: int, launcher: int, mode: str) -> subprocess.Popen:
    """A process that holds ``run_dir`` as ``rank`` the way model.train's ranks do."""
    env = os.environ | {LAUNCHER_ENV: identity(launcher), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RANK_HELPER, str(run_dir), str(rank), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def test_a_new_launcher_stops_the_ranks_a_dead_one_left_and_a_rank_dies_with_its_launcher(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    launcher_b = subprocess.Popen(["sleep", "300"])
    bystander = subprocess.Popen(["sleep", "300"])
    # a rank that escaped its launcher's death (no watchdog), and a rank that watches its launcher
    stale = start_rank(run_a, 1, os.getpid(), "plain")
    watched = start_rank(run_b, 0, launcher_b.pid, "watch")
    try:
        assert stale.stdout.readline() == "claimed\n" and watched.stdout.readline() == "claimed\n"
        # a pid file nobody holds names a live process of someone else: it must be spared
        (run_a / "pids" / "rank0.pid").write_text(f"{identity(bystander.pid)}\n")

        with own_run_folder(run_a, stop_timeout_s=30):
            assert stale.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None

        launcher_b.kill()
        launcher_b.wait()
        assert watched.wait(timeout=10) == -signal.SIGKILL
        assert "its launcher is gone" in watched.stderr.read()
    finally:
        for proc in (stale, watched, launcher_b, bystander):
            proc.kill()
            proc.wait()


def test_a_pid_file_locked_by_a_process_it_does_not_name_is_never_signalled(tmp_path):
    """Stale content (a reused pid) in a locked pid file: nobody is killed, the launcher gives up
    with a message instead."""
    run_dir = tmp_path / "r"
    (run_dir / "pids").mkdir(parents=True)
    pid_file = run_dir / "pids" / "rank0.pid"
    pid_file.write_text(f"{os.getpid()} {process_start(os.getpid()) + 1}\n")  # our pid, another start time
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1]); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)",
            str(pid_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderBusy, match="still locked by a process its pid and start time do not name"):  # noqa: SIM117 - raises wraps the claim alone
            with own_run_folder(run_dir, stop_timeout_s=1):
                pass
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plant", [faults.plant_in_metadata, faults.plant_in_optimizer_item], ids=["metadata", "optimizer-item"]
)
def test_a_crafted_checkpoint_is_refused_naming_the_file_and_its_code_never_runs(tmp_path, plant):
    ok, detail = faults.refuses_crafted(tmp_path, plant)
    assert ok, detail
    assert not (tmp_path / "code-ran").exists()
    assert "posix.system" in detail


def test_a_torn_metrics_row_is_dropped_on_resume(tmp_path):
    from model.train import _metrics_writer

    header = "step,loss,lr,grad_norm,step_time_s,samples_per_s,peak_mem_gib\n"
    whole = "1,0.5,1e-4,0.1,1.0,1.0,0.1\n"
    (tmp_path / "metrics.csv").write_text(header + whole + "2,0.4,1e-4,0.1,1.0\n")  # the disk filled up mid-row
    fh, _ = _metrics_writer(tmp_path, resume_step=2)
    fh.close()
    # a file from before the held-out columns is carried over to today's header, its rows kept
    today = header.rstrip("\n") + ",val_loss,val_loss_pose_off,val_pose_gain\n"
    assert (tmp_path / "metrics.csv").read_text() == today + whole.rstrip("\n") + ",,,\n"


def test_a_full_disk_under_dcp_is_reported_as_the_cause_and_not_retried():
    import json

    from torch.distributed.checkpoint.api import CheckpointException

    from model.train import FAILURE_PREFIX, failure_line
    from tasks.train import _failure

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ws/runs/r/checkpoints/.step-0000002.tmp/__1_0.distcp")
    wrapped = CheckpointException("save failed", {1: (full, None)})
    line = failure_line(wrapped)
    record = json.loads(line.removeprefix(FAILURE_PREFIX))
    assert (
        record["errno"] == errno.ENOSPC
        and "No space left on device" in record["error"]
        and "__1_0.distcp" in record["error"]
    )
    failed = _failure(Path("/nonexistent/run"), 1, [record])
    assert not failed.retryable and "disk full on rank 0" in str(failed) and "free space, then rerun" in str(failed)
    assert _failure(Path("/nonexistent/run"), -9, []).retryable  # a killed rank: the retry resumes


def test_equal_weights_give_equal_adapter_files(tmp_path):
    """safetensors orders its header metadata by a per-map random hash: sorted, a rerun's final
    weights can be compared with an uninterrupted run's byte for byte."""
    import torch

    from model.checkpoint import save_adapter_tensors

    tensors = {
        "transformer.blocks.0.lora_A.default.weight": torch.arange(6.0).view(2, 3),
        "pose_guider.0.bias": torch.ones(2),
    }
    dit = {
        "num_layers": 2,
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "ffn_dim": 64,
        "text_dim": 16,
        "image_dim": 16,
    }
    files = {
        save_adapter_tensors(tensors, tmp_path / str(i), 8, 4, 4.0, dit).joinpath("adapter.safetensors").read_bytes()
        for i in range(8)
    }
    assert len(files) == 1
