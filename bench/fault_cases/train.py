"""Faults of training (issue case 4, checkpoints under faults) and crafted checkpoints (case 6).

Faults, on real torchrun ranks (2 processes, gloo, the tiny profile) started by the real CLI:

- the launcher killed: ``kill -9`` of the CLI's process group mid-training (the ranks, in
  sessions of their own, are not in it); no rank may outlive it for more than a few seconds,
  and a rerun resumes from the last checkpoint and completes;
- the disk fills up inside a checkpoint save (rank 1's writer raises ENOSPC after N bytes, as
  a full disk does, for as long as the fault is set): the run stops at once with the cause
  (no retry: 2 s free no space), the previous checkpoint whole, no final-named partial one;
- rank 0 SIGKILLed inside a checkpoint save (its writer kills it after N bytes): the same.

After each, a rerun completes and its products equal an uninterrupted run's byte for byte (the
final weights, the last checkpoint's data, the losses): every random draw derives from (seed,
rank, step) and every rank computes single-threaded, so the training is deterministic by
construction on the CPU.

Hostile: a checkpoint whose ``.metadata`` pickle would run code, and one whose optimizer item
would (DCP reads those with ``torch.load(weights_only=False)``): refused with an error naming
the file, the code not run. The checkpoint is a real one, saved by the trainer's own save.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.cli import cli_env
from tests.helpers.models import run_config
from tests.helpers.workspaces import make_train_workspace

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
START_TIMEOUT_S = 300
GONE_WITHIN_S = 5.0  # how long a rank may outlive its launcher (PDEATHSIG: at once; the watchdog: 0.5 s)


# --------------------------------------------------------------------------- set-up


# The cases' workspace (make_train_workspace): shards of two synthetic two-person clips and
# their prompt embeddings.
CLIPS = {"num_clips": 2, "num_frames": 12, "width": 64, "height": 48}
# The cases' runs (run_config's overrides): 3 steps, a checkpoint every step (all kept, to compare them).
RUN = {
    "loader": {"num_frames": 5, "height": 32, "width": 32},
    "max_steps": STEPS,
    "checkpoint_every": 1,
    "keep_checkpoints": STEPS,
    "num_workers": 0,
    "nproc": 2,
    "warmup_steps": 1,
}


def config_file(cfg) -> Path:
    path = cfg.workspace / f"{cfg.run_name}.train.json"
    path.write_text(cfg.model_dump_json())
    return path


def base_env(api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The user's environment (no fault set, the workspace's own Prefect home), plus
    ``PREFECT_API_URL`` when a running API is given (tests share theirs) and ``extra``."""
    from model.checkpoint import SAVE_FAULT_ENV
    from model.run_folder import LAUNCHER_ENV
    from model.train import FAULT_ENV, STALL_ENV

    drop = {SAVE_FAULT_ENV, FAULT_ENV, LAUNCHER_ENV, STALL_ENV}
    return {k: v for k, v in cli_env(api_url).items() if k not in drop} | extra


def cli_train(cfg, env: dict[str, str], **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "train", "--train-config", str(config_file(cfg))]
    return subprocess.Popen(args, env=env, cwd=REPO, text=True, errors="replace", **popen)


def run_cli(cfg, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = cli_train(cfg, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=4 * START_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_torchrun(cfg, env: dict[str, str]) -> subprocess.CompletedProcess:
    """torchrun by hand, no launcher: rank 0 owns the run folder itself."""
    from model.train import launch_command

    return subprocess.run(
        launch_command(config_file(cfg), cfg.nproc),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=4 * START_TIMEOUT_S,
    )


def reference_run(ws: Path, env: dict[str, str] | None = None) -> Path:
    """The uninterrupted run the faulted ones must equal; returns its run folder."""
    cfg = run_config(ws, "uninterrupted", **RUN)
    done = run_torchrun(cfg, env or base_env())
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return cfg.run_dir


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- checks


def checkpoint_problems(run_dir: Path, complete: list[int], temporaries: bool = False) -> list[str]:
    """The checkpoints must be exactly the complete ``complete`` steps, each readable (the
    metadata through the safe reader, every data file it names present), and nothing else but
    hidden temporaries where ``temporaries`` (a killed save's, removed by the next run)."""
    from model.checkpoint import checkpoint_dir, read_checkpoint_metadata

    folder = run_dir / "checkpoints"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    names = [n for n in names if not (temporaries and n.startswith("."))]
    expected = [checkpoint_dir(run_dir, s).name for s in complete]
    problems = [] if names == expected else [f"checkpoints {names}, expected {expected}"]
    for step in complete:
        path = checkpoint_dir(run_dir, step)
        try:
            metadata = read_checkpoint_metadata(path)
        except Exception as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        wanted = {info.relative_path for info in metadata.storage_data.values()}
        missing = sorted(n for n in wanted | {"trainer.json"} if not (path / n).is_file())
        if missing:
            problems.append(f"{path.name} lacks {missing}")
    return problems


def product_problems(run_dir: Path, reference: Path) -> list[str]:
    """After a completed rerun: every step logged once, the products equal the uninterrupted
    run's byte for byte, no leftovers, no owner left."""
    import csv

    from model.checkpoint import checkpoint_dir

    problems = checkpoint_problems(run_dir, list(range(1, STEPS + 1)))
    with (run_dir / "metrics.csv").open() as fh:
        rows = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(fh)]
    with (reference / "metrics.csv").open() as fh:
        expected = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(fh)]
    if rows != expected:
        problems.append(f"metrics {rows} != uninterrupted {expected}")
    last = checkpoint_dir(run_dir, STEPS).relative_to(run_dir)
    compared = (
        "final/adapter.safetensors",
        "final/config.json",
        last / "__0_0.distcp",
        last / "__1_0.distcp",
        last / "trainer.json",
    )
    for rel in compared:
        a, b = run_dir / rel, reference / rel
        if not a.is_file() or a.read_bytes() != b.read_bytes():
            problems.append(f"{rel} differs from the uninterrupted run's")
    if (run_dir / "pids" / "owner.pid").exists():
        problems.append("pids/owner.pid left behind by a finished run")
    return problems


def rank_identities(run_dir: Path) -> list[tuple[int, int]]:
    from model.run_folder import parse_identity

    found = [parse_identity(p.read_text()) for p in sorted((run_dir / "pids").glob("rank*.pid"))]
    return [i for i in found if i is not None]


def live(identities: list[tuple[int, int]]) -> list[int]:
    from model.run_folder import alive

    return [who[0] for who in identities if alive(who)]


# --------------------------------------------------------------------------- the faults


def kill_launcher(cfg, env: dict[str, str]) -> list[str]:
    """Start ``multianimate train`` (the ranks stall once step 1 and its checkpoint are done),
    then SIGKILL the CLI's whole process group; report ranks that outlive it."""
    from model.train import STALL_ENV

    log = cfg.workspace / f"{cfg.run_name}.killed.log"
    with log.open("w") as out:
        proc = cli_train(cfg, env | {STALL_ENV: "1"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        first = cfg.run_dir / "checkpoints" / "step-0000001"
        while not (first.is_dir() and len(live(rank_identities(cfg.run_dir))) == cfg.nproc):
            if proc.poll() is not None or time.monotonic() > deadline:
                return [f"training never reached step 2 (CLI status {proc.poll()}): {tail(log.read_text())}"]
            time.sleep(0.2)
        ranks = rank_identities(cfg.run_dir)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Prefect server and torchrun's agent; not the ranks
        proc.wait()
    killed = time.monotonic()
    while live(ranks) and time.monotonic() - killed < GONE_WITHIN_S:
        time.sleep(0.05)
    survivors = live(ranks)
    for pid in survivors:  # clean up after a regression
        os.kill(pid, signal.SIGKILL)
    if survivors:
        return [f"rank pid(s) {survivors} still running {GONE_WITHIN_S:.0f} s after the launcher's group was killed"]
    return []


def fill_disk_in_save(cfg, env: dict[str, str], rank: int = 1, step: int = 2, budget: int = 200_000) -> list[str]:
    """``multianimate train`` whose ``rank`` runs out of disk after ``budget`` bytes of the
    step-``step`` checkpoint: it must fail at once (no retry), naming the cause on its last line."""
    from model.checkpoint import SAVE_FAULT_ENV

    done = run_cli(cfg, env | {SAVE_FAULT_ENV: f"{rank}:{step}:{budget}:enospc"})
    problems = []
    if done.returncode == 0:
        problems.append("the run succeeded on a full disk")
    attempts = done.stdout.count("torchrun with")
    if attempts != 1:
        problems.append(f"{attempts} torchrun attempts on a full disk (a retry cannot free space)")
    if "disk full" not in done.stdout or "[Errno 28]" not in done.stdout:
        problems.append(f"the output does not name the full disk: {tail(done.stdout)}")
    return problems


def kill_in_save(cfg, env: dict[str, str], rank: int = 0, step: int = 2, budget: int = 200_000) -> list[str]:
    """torchrun whose ``rank`` SIGKILLs itself after ``budget`` bytes of the step-``step`` save."""
    from model.checkpoint import SAVE_FAULT_ENV, SAVE_FAULT_MARKER

    done = run_torchrun(cfg, env | {SAVE_FAULT_ENV: f"{rank}:{step}:{budget}:kill"})
    problems = []
    if not (cfg.run_dir / SAVE_FAULT_MARKER).is_file():
        problems.append(f"the fault did not fire (status {done.returncode}): {tail(done.stderr)}")
    if done.returncode == 0:
        problems.append("torchrun succeeded although a rank was killed")
    return problems


def rerun(cfg, env: dict[str, str], resume_from: int) -> list[str]:
    done = run_cli(cfg, env)
    if done.returncode != 0:
        return [f"the rerun failed: {tail(done.stdout)}"]
    if f"resuming from step-{resume_from:07d}" not in done.stdout:
        return [f"the rerun did not resume from step {resume_from}: {tail(done.stdout, 12)}"]
    return []


def _verdict(problems: list[str], ok_detail: str) -> tuple[bool, str]:
    return (not problems, "; ".join(problems) if problems else ok_detail)


def launcher_killed(ws: Path, reference: Path, env: dict[str, str], name: str = "killed-launcher") -> tuple[bool, str]:
    cfg = run_config(ws, name, **RUN)
    problems = kill_launcher(cfg, env)
    problems += checkpoint_problems(cfg.run_dir, [1])
    problems += rerun(cfg, env, resume_from=1) or product_problems(cfg.run_dir, reference)
    return _verdict(
        problems,
        f"no rank outlived the launcher by {GONE_WITHIN_S:.0f} s; the rerun resumed from step 1 "
        "and equals an uninterrupted run",
    )


def disk_full_in_checkpoint(
    ws: Path, reference: Path, env: dict[str, str], name: str = "disk-full"
) -> tuple[bool, str]:
    cfg = run_config(ws, name, **RUN)
    problems = fill_disk_in_save(cfg, env)
    problems += checkpoint_problems(cfg.run_dir, [1])  # step 1 whole, no step 2, no temporary left
    problems += rerun(cfg, env, resume_from=1) or product_problems(cfg.run_dir, reference)
    return _verdict(
        problems,
        "failed at once naming ENOSPC, step 1 intact, no partial step 2; the rerun equals an uninterrupted run",
    )


def killed_in_checkpoint(
    ws: Path, reference: Path, env: dict[str, str], name: str = "killed-in-save"
) -> tuple[bool, str]:
    from model.checkpoint import checkpoint_dir, temp_checkpoint_dir

    cfg = run_config(ws, name, **RUN)
    problems = kill_in_save(cfg, env)
    problems += checkpoint_problems(cfg.run_dir, [1], temporaries=True)
    if not temp_checkpoint_dir(checkpoint_dir(cfg.run_dir, 2)).is_dir():
        problems.append("no partial save under the temporary name: was the kill inside the save?")
    problems += rerun(cfg, env, resume_from=1) or product_problems(cfg.run_dir, reference)
    return _verdict(
        problems,
        "step 1 intact, the partial step 2 only under its temporary name; "
        "the rerun removed it and equals an uninterrupted run",
    )


def case_launcher_killed(tmp: Path) -> tuple[bool, str]:
    ws = make_train_workspace(tmp / "ws", **CLIPS)
    return launcher_killed(ws, reference_run(ws), base_env())


def case_disk_full_in_checkpoint(tmp: Path) -> tuple[bool, str]:
    ws = make_train_workspace(tmp / "ws", **CLIPS)
    return disk_full_in_checkpoint(ws, reference_run(ws), base_env())


def case_killed_in_checkpoint(tmp: Path) -> tuple[bool, str]:
    ws = make_train_workspace(tmp / "ws", **CLIPS)
    return killed_in_checkpoint(ws, reference_run(ws), base_env())


# --------------------------------------------------------------------------- hostile checkpoints


class _RunsCode:
    """Unpickling this runs a shell command (what a crafted file would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def trained_checkpoint(folder: Path):
    """A real training checkpoint of the tiny model, saved by the trainer's own save (one
    process), and the (model, optimizer, scheduler) that load it."""
    import torch

    from data_schemas.model import ModelConfig
    from data_schemas.train import TrainConfig
    from model.components import build_components
    from model.train import ConditionedDenoiser, _save_checkpoint, parameter_groups

    def fresh():
        torch.manual_seed(0)
        dit = build_components(ModelConfig()).dit
        dit.set_trainable()
        model = ConditionedDenoiser(dit)
        optimizer = torch.optim.AdamW(parameter_groups(model, TrainConfig()), lr=1e-4)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    model, optimizer, scheduler = fresh()
    _save_checkpoint(folder, 1, model, optimizer, scheduler, rank=0, keep=1)
    return folder / "checkpoints" / "step-0000001", fresh


def plant_in_metadata(checkpoint: Path, marker: Path) -> None:
    """Rewrite ``.metadata`` as the same metadata carrying an object that runs code."""
    from model.checkpoint import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(checkpoint)
    metadata.planner_data = {"x": _RunsCode(f"touch {shlex.quote(str(marker))}")}
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def plant_in_optimizer_item(checkpoint: Path, marker: Path) -> str:
    """Point one optimizer hyper-parameter (a pickled item that DCP torch.loads) at a blob that
    runs code; returns the item's name."""
    import torch

    from model.checkpoint import read_checkpoint_metadata

    metadata = read_checkpoint_metadata(checkpoint)
    index = next(i for i in metadata.storage_data if i.fqn.endswith("param_groups.0.lr"))
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(_RunsCode(f"touch {shlex.quote(str(marker))}"), blob)
    data_file = checkpoint / info.relative_path
    info.offset, info.length = data_file.stat().st_size, len(blob.getvalue())
    with data_file.open("ab") as fh:
        fh.write(blob.getvalue())
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    return index.fqn


def refuses_crafted(tmp: Path, plant) -> tuple[bool, str]:
    from model.checkpoint import UnsafeCheckpointError
    from model.train import _load_checkpoint

    checkpoint, fresh = trained_checkpoint(tmp / "run")
    marker = tmp / "code-ran"
    plant(checkpoint, marker)
    try:
        _load_checkpoint(checkpoint, *fresh())
    except UnsafeCheckpointError as exc:
        if marker.exists():
            return False, f"refused, but only after the code ran: {exc}"
        named = str(checkpoint) in str(exc)
        return named, f"refused: {str(exc)[:200]}" if named else f"refused without naming the file: {exc}"
    except BaseException as exc:
        return False, f"{'code ran; ' if marker.exists() else ''}{type(exc).__name__}: {str(exc)[:300]}"
    return False, f"loaded{' and the code ran' if marker.exists() else ''}"


def case_crafted_metadata(tmp: Path) -> tuple[bool, str]:
    return refuses_crafted(tmp, plant_in_metadata)


def case_crafted_optimizer_item(tmp: Path) -> tuple[bool, str]:
    return refuses_crafted(tmp, plant_in_optimizer_item)


CASES = [
    ("kill -9 of the launcher's process group mid-training, then a rerun", "fault", case_launcher_killed),
    ("disk full inside a checkpoint save, then a rerun", "fault", case_disk_full_in_checkpoint),
    ("SIGKILL of a rank inside a checkpoint save, then a rerun", "fault", case_killed_in_checkpoint),
    ("a checkpoint .metadata whose pickle runs code", "hostile", case_crafted_metadata),
    ("a checkpoint optimizer item whose pickle runs code", "hostile", case_crafted_optimizer_item),
]
