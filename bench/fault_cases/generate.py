"""Generation's fault catalogue: the hostile job specs of the issue, refused at submission
(the command line) or at the API (the generate flow's ``jobs``, confined to the allowed
roots), and two faults: a job past its time limit, and a batch SIGKILLed mid-run then run
again. Each case takes a fresh temporary folder and returns ``(ok, detail)``; the tests
(tests/faults/test_faults_generate.py) call the same functions and check more.

Jobs are driven by ground-truth poses and masks of synthetic clips (no pose models) on the
tiny profile, so a job takes about a second on a CPU."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_schemas.workspace import Workspace
from tests.helpers.cli import cli_env

REPO = Path(__file__).resolve().parents[2]
SIZE = 64  # the reference image and the driving clip (pixels, square)


# ---- inputs ----------------------------------------------------------------------------


def job_inputs(folder: Path, num_frames: int = 12) -> dict[str, Path]:
    """A reference image with its ground-truth poses, and a driving clip's poses and masks
    (two persons each): ``reference``, ``reference_poses``, ``poses``, ``masks``."""
    import cv2

    from preprocess.synthetic import SyntheticSpec, render_clip, write_ground_truth_stage_files

    folder = Path(folder)
    drive = render_clip(SyntheticSpec(width=SIZE, height=SIZE, num_frames=num_frames, num_persons=2, seed=901))
    poses, masks = write_ground_truth_stage_files(drive, folder / "driving")
    ref = render_clip(SyntheticSpec(width=SIZE, height=SIZE, num_frames=1, num_persons=2, seed=902))
    reference = folder / "reference.png"
    cv2.imwrite(str(reference), ref.frames[0][..., ::-1])
    ref_poses, _ = write_ground_truth_stage_files(ref, folder / "reference")
    return {"reference": reference, "reference_poses": ref_poses, "poses": poses, "masks": masks}


def driving_video(path: Path, seconds: float = 4.0) -> Path:
    """A busy H.264 test pattern (moov first, so damage in the middle hits frame data)."""
    args = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size=320x240:rate=25:duration={seconds}",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        str(path),
    ]
    subprocess.run(args, check=True, capture_output=True)
    return path


def corrupt_middle(path: Path, nbytes: int = 4096, seed: int = 0) -> Path:
    """Overwrite ``nbytes`` in the middle of a file with random bytes (the issue's case 3)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + nbytes] = random.Random(seed).randbytes(nbytes)
    path.write_bytes(bytes(data))
    return path


def png(path: Path, width: int, height: int) -> Path:
    """A valid PNG of one colour (1-bit: a 10000x10000 one is 12 MB in memory, 12 KB on disk)."""
    from PIL import Image

    Image.new("1" if width * height > 2**24 else "RGB", (width, height), 1).save(path)
    return path


def npz_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """An npz (a zip of .npy files) whose ``label_map`` header claims ``shape`` of uint8 but
    holds no data: a few hundred bytes that a trusting loader would allocate in full."""
    import io
    import zipfile

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    small = io.BytesIO()
    np.save(small, np.zeros((1, 2), np.int16))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("label_map.npy", header.getvalue())  # magic and header, then nothing
        archive.writestr("pose_index.npy", small.getvalue())
    return path


def diverged_adapter(folder: Path) -> Path:
    """Tiny-profile MultiAnimate weights in our format whose training diverged: one LoRA
    matrix holds NaNs (as a run without clipping can end). Returns the folder."""
    import torch

    from data_schemas.model import ModelConfig
    from model.checkpoint import save_adapter
    from model.components import build_components

    model = ModelConfig()
    dit = build_components(model).dit
    weight = next(p for n, p in dit.transformer.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    return save_adapter(dit, Path(folder), model.lora_rank, model.lora_alpha)


# ---- the command line ------------------------------------------------------------------


def submit(args: list[str]) -> tuple[int, str]:
    """``multianimate submit ARGS`` (the real typer app, in this process): (exit code, output)."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(
        app, ["submit", *map(str, args)], env={"COLUMNS": "1000"}
    )  # rich would wrap the message
    text = result.output.translate({ord(c): " " for c in "│─╭╮╰╯"})  # rich's error box
    return result.exit_code, " ".join(text.split())


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``multianimate ARGS`` as a child process."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=REPO,
        env=cli_env(keep_api_url=True),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def queue_small_jobs(
    workspace: Path, inputs: dict[str, Path], seeds: list[int], steps: int = 2, extra: tuple = ()
) -> list[str]:
    """Submit one 5-frame 64x64 job per seed with the command line; their ids, in queue order."""
    ids = []
    for seed in seeds:
        code, out = submit(
            [
                inputs["reference"],
                "--poses",
                inputs["poses"],
                "--masks",
                inputs["masks"],
                "--reference-poses",
                inputs["reference_poses"],
                "--num-frames",
                5,
                "--height",
                SIZE,
                "--width",
                SIZE,
                "--steps",
                steps,
                "--seed",
                seed,
                *extra,
                "-w",
                workspace,
            ]
        )
        if code != 0:
            raise RuntimeError(f"submit failed ({code}): {out}")
        ids.append(out.split()[-1])
        time.sleep(0.01)  # the queue is ordered by submission time
    return ids


# ---- hostile specs ---------------------------------------------------------------------


def _refused(tmp: Path, args: list, expect: str) -> tuple[bool, str]:
    """Submit ``args``: refused when the exit code is non-zero, the message holds ``expect``
    and nothing was queued."""
    workspace = tmp / "ws"
    code, out = submit([*args, "-w", workspace])
    queue = Workspace(workspace).queue
    queued = list(queue.glob("*.json")) if queue.is_dir() else []
    ok = code != 0 and expect in out and not queued
    return ok, f"exit {code}, {len(queued)} queued: {out.partition(' Error ')[2][:300]}"


def _valid_args(tmp: Path) -> tuple[dict[str, Path], list]:
    inputs = job_inputs(tmp / "in")
    args = [
        "--poses",
        inputs["poses"],
        "--masks",
        inputs["masks"],
        "--reference-poses",
        inputs["reference_poses"],
        "--num-frames",
        5,
        "--height",
        SIZE,
        "--width",
        SIZE,
        "--steps",
        2,
    ]
    return inputs, args


def case_text_reference(tmp: Path) -> tuple[bool, str]:
    _, args = _valid_args(tmp)
    text = tmp / "notes.png"
    text.write_text("not an image, whatever the name says\n")
    return _refused(tmp, [text, *args], f"reference: {text}: not a readable image")


def case_tiny_reference(tmp: Path) -> tuple[bool, str]:
    _, args = _valid_args(tmp)
    return _refused(tmp, [png(tmp / "dot.png", 1, 1), *args], "1x1 px is smaller than 32 px on a side")


def case_huge_reference(tmp: Path) -> tuple[bool, str]:
    _, args = _valid_args(tmp)
    return _refused(tmp, [png(tmp / "huge.png", 10000, 10000), *args], "10000x10000 px has more than")


def case_corrupt_video(tmp: Path) -> tuple[bool, str]:
    inputs, _ = _valid_args(tmp)
    video = corrupt_middle(driving_video(tmp / "dance.mp4"))
    args = [inputs["reference"], "--video", video, "--num-frames", 33, "--fps", 15, "--height", SIZE, "--width", SIZE]
    return _refused(tmp, args, f"driving_video: {video}: driving video does not decode cleanly (undecodable)")


def case_missing_file(tmp: Path) -> tuple[bool, str]:
    _, args = _valid_args(tmp)
    return _refused(tmp, [tmp / "gone.png", *args], f"reference: {tmp / 'gone.png'}: reference image not found")


def case_traversal_cli(tmp: Path) -> tuple[bool, str]:
    _, args = _valid_args(tmp)
    sneaky = f"{tmp}/ws/../../../../../../../../etc/passwd"
    return _refused(tmp, [sneaky, *args], "reference: /etc/passwd: not a readable image")


def case_height(tmp: Path) -> tuple[bool, str]:
    inputs, args = _valid_args(tmp)
    return _refused(
        tmp,
        [inputs["reference"], *args, "--height", 1_000_000_000],
        "height=1000000000: Input should be less than or equal to 2048",
    )


def case_fps(tmp: Path) -> tuple[bool, str]:
    inputs, args = _valid_args(tmp)
    return _refused(
        tmp, [inputs["reference"], *args, "--fps", "1e-9"], "fps=1e-09: Input should be greater than or equal to 1"
    )


def case_guidance(tmp: Path) -> tuple[bool, str]:
    inputs, args = _valid_args(tmp)
    return _refused(
        tmp,
        [inputs["reference"], *args, "--guidance-scale", "1e308"],
        "guidance_scale=1e+308: Input should be less than or equal to 20",
    )


def case_symlink_cli(tmp: Path) -> tuple[bool, str]:
    _, args = _valid_args(tmp)
    link = tmp / "innocent.png"
    link.symlink_to("/etc/shadow")
    # not confined (the user's own authority), but never an image: unreadable, or not decodable
    return _refused(tmp, [link, *args], f"reference: {link}: ")


def case_npz_bomb(tmp: Path) -> tuple[bool, str]:
    inputs, _ = _valid_args(tmp)
    bomb = npz_claiming(tmp / "masks.npz", (100_000, 10_000, 10_000))  # 10 TB claimed
    args = [
        inputs["reference"],
        "--poses",
        inputs["poses"],
        "--masks",
        bomb,
        "--reference-poses",
        inputs["reference_poses"],
        "--num-frames",
        5,
        "--height",
        SIZE,
        "--width",
        SIZE,
    ]
    return _refused(tmp, args, f"{bomb}: masks npz is not a usable npz (its arrays would take over")


def _api_refused(tmp: Path, reference: Path, expect: str) -> tuple[bool, str]:
    """Queue a spec the way the generate flow's ``jobs`` parameter does (API, UI): confined to
    the workspace and ``generate.input_roots``."""
    from data_schemas import ProjectConfig
    from data_schemas.job import JobSpec
    from flows.generate import queue_jobs

    workspace = tmp / "ws"
    inputs = job_inputs(workspace / "inputs")  # inside the workspace: allowed
    spec = JobSpec(
        reference=Path(reference),
        poses=inputs["poses"],
        masks=inputs["masks"],
        reference_poses=inputs["reference_poses"],
        num_frames=5,
        height=SIZE,
        width=SIZE,
        steps=2,
    )
    try:
        queue_jobs(workspace, [spec], ProjectConfig())
    except ValueError as exc:
        queue = Workspace(workspace).queue
        queued = list(queue.glob("*.json")) if queue.is_dir() else []
        return expect in str(exc) and not queued, f"{len(queued)} queued: {exc}"
    return False, "queued"


def case_traversal_api(tmp: Path) -> tuple[bool, str]:
    sneaky = Path(f"{tmp}/ws/../../../../../../../../etc/passwd")
    return _api_refused(
        tmp, sneaky, f"reference: {sneaky} resolves (symlinks and '..' followed) outside the allowed roots"
    )


def case_symlink_api(tmp: Path) -> tuple[bool, str]:
    link = tmp / "ws" / "inputs" / "innocent.png"
    link.parent.mkdir(parents=True)
    link.symlink_to("/etc/shadow")
    return _api_refused(tmp, link, f"reference: {link} resolves (symlinks and '..' followed) outside the allowed roots")


# ---- faults ----------------------------------------------------------------------------


def _output_folders(workspace: Path) -> dict[str, list[str]]:
    """Every entry of outputs/ (temporary ones included) with its files."""
    folder = Workspace(workspace).outputs
    return {p.name: sorted(q.name for q in p.iterdir()) for p in sorted(folder.iterdir())} if folder.is_dir() else {}


COMPLETE = ["job.json", "preview.mp4", "preview.png", "video.mp4"]


def _frames(path: Path) -> int:
    import cv2

    video = cv2.VideoCapture(str(path))
    count = 0
    while video.read()[0]:
        count += 1
    return count


def case_killed_batch(tmp: Path) -> tuple[bool, str]:
    """Three queued jobs; ``multianimate generate`` SIGKILLed (its whole process group) once
    the first is published; then run again: three outputs, whole, the first never redone."""
    from data_schemas.job import read_record

    workspace = tmp / "ws"
    inputs = job_inputs(tmp / "in")
    ids = queue_small_jobs(workspace, inputs, seeds=[1, 2, 3], steps=8)
    first = Workspace(workspace).output(ids[0]) / "job.json"
    with open(tmp / "first-run.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "generate", "-w", str(workspace)],
            cwd=REPO,
            env=cli_env(keep_api_url=True),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not first.exists():
        return False, f"the first job was not published before the kill: {(tmp / 'first-run.log').read_text()[-2000:]}"
    after_kill = _output_folders(workspace)
    # published folders are whole; anything else is a temporary (dot) name
    half = {name: files for name, files in after_kill.items() if not name.startswith(".") and files != COMPLETE}
    finished = {i for i in ids if (r := read_record(workspace, i)) is not None and r.status == "ok"}
    kept = (first.stat().st_ino, first.stat().st_mtime_ns, read_record(workspace, ids[0]))
    rerun = cli("generate", "-w", workspace)
    final = _output_folders(workspace)
    records = {i: read_record(workspace, i) for i in ids}
    problems = []
    if half:
        problems.append(f"half-written folders published after the kill: {half}")
    if rerun.returncode != 0:
        problems.append(f"rerun exited {rerun.returncode}: {(rerun.stdout + rerun.stderr)[-1500:]}")
    if final != {i: COMPLETE for i in ids}:
        problems.append(f"outputs after the rerun: {final}")
    if (first.stat().st_ino, first.stat().st_mtime_ns, records[ids[0]]) != kept:
        problems.append("the first job, finished before the kill, was redone")
    bad = [
        i for i, r in records.items() if r is None or r.status != "ok" or _frames(workspace / r.outputs["video"]) != 5
    ]
    if bad:
        problems.append(f"jobs without a whole 5-frame video: {bad}")
    detail = (
        f"killed with {len(finished)}/3 finished ({sorted(after_kill)}); rerun: {' '.join(rerun.stdout.split())[:300]}"
    )
    return not problems, "; ".join(problems) or detail


LIMIT_S = 10


def case_job_timeout(tmp: Path) -> tuple[bool, str]:
    """A runaway job (1000 denoising steps at 256x256) under a 10 s limit, queued before a small one: it
    is stopped and recorded as ``timeout``, the small one runs, the run ends promptly; a
    rerun with the default limit finishes it: nothing lost."""
    from data_schemas.job import read_record

    workspace = tmp / "ws"
    inputs = job_inputs(tmp / "in")
    runaway = queue_small_jobs(workspace, inputs, seeds=[1], steps=1000, extra=("--height", 256, "--width", 256))[
        0
    ]  # > 10 s on a CPU
    small = queue_small_jobs(workspace, inputs, seeds=[2])[0]  # well under a second
    start = time.monotonic()
    first = cli("generate", "-w", workspace, "--job-timeout", LIMIT_S)
    seconds = time.monotonic() - start
    stopped, other = read_record(workspace, runaway), read_record(workspace, small)
    problems = []
    if first.returncode == 0:
        problems.append("the run exited 0 with a failed job")
    if stopped is None or stopped.status != "failed" or stopped.reason != "timeout" or stopped.seconds > LIMIT_S + 30:
        problems.append(f"runaway job: {_summary(stopped)}")
    elif _output_folders(workspace).get(runaway) != ["job.json"]:
        problems.append(f"the timed-out job left files: {_output_folders(workspace).get(runaway)}")
    if other is None or other.status != "ok":
        problems.append(f"the job after it: {_summary(other)}")
    rerun = cli("generate", "-w", workspace, timeout=900)
    finished = read_record(workspace, runaway)
    if (
        rerun.returncode != 0
        or finished is None
        or finished.status != "ok"
        or _frames(workspace / finished.outputs["video"]) != 5
    ):
        problems.append(
            f"rerun without the limit ({rerun.returncode}): {_summary(finished)}; {(rerun.stdout + rerun.stderr)[-800:]}"
        )
    if problems:
        return False, "; ".join(problems)
    return True, (
        f"first run {seconds:.0f} s: {stopped.error}; the job after it ok; "
        f"the rerun without the limit finished it in {finished.seconds:.0f} s"
    )


def _summary(record) -> str:
    return (
        "no record"
        if record is None
        else f"{record.status} ({record.reason}) after {record.seconds:.1f} s: {record.error}"
    )


def case_diverged_weights(tmp: Path) -> tuple[bool, str]:
    """A job whose model's weights diverged (NaN) queued before a healthy one: it fails as
    ``degenerate_output`` at its first step with no video, the healthy one is generated, the
    run exits non-zero naming it."""
    import yaml

    from data_schemas.job import read_record

    workspace = tmp / "ws"
    inputs = job_inputs(tmp / "in")
    profile = tmp / "diverged.yaml"
    profile.write_text(yaml.safe_dump({"model": {"multianimate": str(diverged_adapter(tmp / "diverged"))}}))
    broken = queue_small_jobs(workspace, inputs, seeds=[1], extra=("-c", profile))[0]
    healthy = queue_small_jobs(workspace, inputs, seeds=[2])[0]
    run = cli("generate", "-w", workspace)
    record, other = read_record(workspace, broken), read_record(workspace, healthy)
    problems = []
    if run.returncode == 0 or broken not in run.stdout:
        problems.append(f"the run exited {run.returncode} without naming the failed job")
    if (
        record is None
        or record.status != "failed"
        or record.reason != "degenerate_output"
        or "non-finite latents" not in (record.error or "")
    ):
        problems.append(f"diverged job: {_summary(record)}")
    elif _output_folders(workspace).get(broken) != ["job.json"]:
        problems.append(f"the diverged job left files: {_output_folders(workspace).get(broken)}")
    if other is None or other.status != "ok":
        problems.append(f"the job after it: {_summary(other)}")
    return not problems, "; ".join(problems) or f"{record.reason}: {record.error}"


CASES = [
    ("text file as the reference image", "hostile", case_text_reference),
    ("1x1 PNG reference", "hostile", case_tiny_reference),
    ("10000x10000 PNG reference", "hostile", case_huge_reference),
    ("driving video with 4 KB of random bytes mid-file", "hostile", case_corrupt_video),
    ("missing reference file", "hostile", case_missing_file),
    ("ws/../../../../etc/passwd as the reference (command line)", "hostile", case_traversal_cli),
    ("ws/../../../../etc/passwd as the reference (API: outside the roots)", "hostile", case_traversal_api),
    ("symlink to /etc/shadow as the reference (command line)", "hostile", case_symlink_cli),
    ("symlink to /etc/shadow as the reference (API: outside the roots)", "hostile", case_symlink_api),
    ("masks npz whose header claims 10 TB", "hostile", case_npz_bomb),
    ("--height 1000000000", "hostile", case_height),
    ("--fps 1e-9", "hostile", case_fps),
    ("--guidance-scale 1e308", "hostile", case_guidance),
    ("a job past its time limit, then a rerun", "fault", case_job_timeout),
    ("a job whose model diverged (NaN weights) before a healthy one", "fault", case_diverged_weights),
    ("generate SIGKILLed after 1 of 3 jobs, then a rerun", "fault", case_killed_batch),
]
