"""The input files of a generation job, checked before it is queued and again before it runs.

A job names files by path; this module decides whether the job may and can read them:

* **confinement** (jobs that arrive through the Prefect API): every input and weight path
  must resolve, symlinks followed, inside one of the allowed roots (the workspace and the
  profile's ``generate.input_roots``). ``/ws/../../etc/passwd`` and a link to
  ``/etc/shadow`` resolve outside and are refused before the file is even looked at, so a
  caller learns nothing about files outside the roots. Jobs queued with the command line are
  not confined: they read what their user can. The check and the later read are separate
  moments: whoever can write inside a root can still swap a file in between, so the roots
  are trusted folders, not a sandbox.
* **a regular, readable file**: missing files, dangling links, FIFOs and devices (which
  would block or never end) and unreadable files are refused by name.
* **content**: the reference decodes as an image within the size bounds (its header is read
  first, so a 10000x10000 PNG is refused without decoding it); a driving video is probed
  and decoded whole by ffmpeg in a killable child process (the generate flow's ingest will
  decode all of it too), within ingest's size limits and ``generate.max_driving_s``, long
  enough for the job's frames, without decoder errors; poses and masks npz files have array
  headers that fit ``generate.max_array_bytes`` before they are loaded (an npz is a zip:
  a small file can claim terabytes) and are read by the same loaders the job uses.

Every problem is reported at once, each naming the field, the file and the reason.
"""

from __future__ import annotations

import os
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np

from data_schemas.config import IngestConfig
from data_schemas.job import GenerateConfig, JobSpec
from preprocess.media import MediaError, MediaTimeout, input_url, last_error_line, probe, run_tool

ROLES = {
    "reference": "reference image",
    "reference_poses": "reference poses",
    "driving_video": "driving video",
    "poses": "poses npz",
    "masks": "masks npz",
}
MIN_VIDEO_SIDE = 16  # ingest scales to even sizes; smaller frames hold no usable person


class JobInputError(ValueError):
    """One or more inputs of a job are refused; ``problems`` maps each field to why."""

    def __init__(self, problems: dict[str, str]):
        super().__init__("; ".join(f"{field}: {why}" for field, why in problems.items()))
        self.problems = problems


def resolved_inside(path: Path, roots: tuple[Path, ...] | list[Path]) -> Path | None:
    """``path`` with every symlink and ``..`` resolved, when that is inside one of ``roots``
    (themselves resolved); None otherwise."""
    real = Path(os.path.realpath(path))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real.is_relative_to(real_root):
            return real
    return None


def _regular_file(path: Path, role: str) -> None:
    """A ValueError naming the file unless it is a regular file we can open for reading."""
    try:
        info = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise ValueError(f"{path}: {role} not found" + (" (a dangling symlink)" if dangling else "")) from None
    except OSError as exc:  # ELOOP, EACCES on a parent, ENAMETOOLONG, ...
        raise ValueError(f"{path}: {role} cannot be reached ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: {role} is not a regular file (a folder, FIFO or device cannot be an input)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{path}: {role} is unreadable ({exc.strerror or exc})") from None


def check_reference_image(path: Path, limits: GenerateConfig) -> tuple[int, int]:
    """(width, height) of a reference image within the bounds, decoded by the job's reader."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: our bounds below decide
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if min(width, height) < limits.min_reference_side:
        raise ValueError(
            f"{path}: reference image of {width}x{height} px is smaller than "
            f"{limits.min_reference_side} px on a side (generate.min_reference_side)"
        )
    if width * height > limits.max_reference_pixels:
        raise ValueError(
            f"{path}: reference image of {width}x{height} px has more than {limits.max_reference_pixels:,} "
            "pixels (generate.max_reference_pixels)"
        )
    from preprocess.retarget import read_reference_image  # the reader the job uses

    read_reference_image(path)
    return width, height


def check_driving_video(path: Path, spec: JobSpec, ingest: IngestConfig, limits: GenerateConfig, decode: bool) -> None:
    """Probe (and with ``decode``, decode whole) a driving video with ffprobe/ffmpeg in
    killable child processes; a ValueError names the file and the reason."""
    size = os.path.getsize(path)
    if size > ingest.max_file_bytes:
        raise ValueError(
            f"{path}: driving video of {size:,} bytes is over ingest.max_file_bytes ({ingest.max_file_bytes:,})"
        )
    try:
        info = probe(path, ingest.probe_timeout_s)
    except MediaTimeout as exc:  # no verdict about the file: say so, never "corrupt"
        raise ValueError(f"{exc} (a slow disk or a loaded host? submit again)") from None
    except MediaError as exc:
        raise ValueError(f"{exc} ({exc.reason})") from None
    if min(info.width, info.height) < MIN_VIDEO_SIDE or info.width * info.height > ingest.max_pixels:
        raise ValueError(
            f"{path}: driving video of {info.width}x{info.height} px is outside {MIN_VIDEO_SIDE} px a side "
            f"to {ingest.max_pixels:,} pixels (ingest.max_pixels)"
        )
    duration = info.duration_s
    if duration is not None and duration > limits.max_driving_s:
        raise ValueError(
            f"{path}: driving video of {duration:.0f} s is longer than generate.max_driving_s "
            f"({limits.max_driving_s:g} s); its poses and masks are extracted whole: cut it first"
        )
    # ingest resamples by timestamps: about duration x fps frames (the flow checks the exact count)
    if duration is not None and duration * spec.fps + 0.5 < spec.num_frames:
        raise ValueError(
            f"{path}: driving video of {duration:.2f} s gives about {duration * spec.fps:.0f} frames at "
            f"{spec.fps:g} fps; the job needs {spec.num_frames}"
        )
    if not decode:
        return
    seconds = duration if duration is not None else limits.max_driving_s
    timeout = max(ingest.decode_timeout_min_s, ingest.decode_timeout_factor * seconds)
    args = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-t",
        f"{limits.max_driving_s:g}",
        "-i",
        input_url(path),
        "-map",
        "0:v:0",
        "-f",
        "null",
        "-",
    ]
    try:
        done = run_tool(args, timeout, f"decoding {path}")
    except MediaTimeout as exc:
        raise ValueError(f"{exc} (a slow disk or a loaded host? submit again)") from None
    errors = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0 or errors:
        count = len(errors.splitlines())
        raise ValueError(
            f"{path}: driving video does not decode cleanly (undecodable): {count} decoder error line(s), "
            f"last: {last_error_line(done.stderr) if errors else f'ffmpeg exited with {done.returncode}'}"
        )


def check_npz_headers(path: Path, role: str, max_bytes: int) -> None:
    """Refuse an npz whose members would take more than ``max_bytes`` once loaded, from the
    zip directory and the .npy headers alone (nothing is decompressed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    raise ValueError(f"member {member.filename!r} is not an array")
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"{member.filename}: .npy format version {version} (numpy writes 1.0 or 2.0)")
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(f)  # the header only: nothing is decompressed beyond it
                if dtype.hasobject:
                    raise ValueError(f"{member.filename} holds Python objects (a pickle)")
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
                if total > max_bytes:
                    raise ValueError(f"its arrays would take over {max_bytes:,} bytes (generate.max_array_bytes)")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: {role} is not a usable npz ({exc})") from None


def check_job_inputs(
    spec: JobSpec,
    ingest: IngestConfig,
    limits: GenerateConfig,
    roots: tuple[Path, ...] | list[Path] | None = None,
    decode: bool = True,
) -> None:
    """Raise ``JobInputError`` naming every refused input of ``spec``. ``roots``: confine
    every input and weight path to them (jobs from the API); ``decode``: decode the driving
    video whole (at submission; the generate flow's ingest decodes it again anyway)."""
    problems: dict[str, str] = {}
    files = spec.input_files()
    if roots is not None:
        for field, path in (files | spec.model_paths()).items():
            if resolved_inside(path, roots) is None:
                # where it leads is not said: a symlink's target is news to a caller from the API
                problems[field] = (
                    f"{path} resolves (symlinks and '..' followed) outside the allowed roots "
                    f"({', '.join(str(r) for r in roots)}; see generate.input_roots)"
                )
    for field, path in files.items():
        if field in problems:
            continue
        try:
            _regular_file(path, ROLES[field])
            if field == "reference":
                check_reference_image(path, limits)
            elif field == "driving_video":
                check_driving_video(path, spec, ingest, limits, decode)
            elif field == "reference_poses":
                check_npz_headers(path, ROLES[field], limits.max_array_bytes)
                from preprocess.retarget import load_reference_poses

                load_reference_poses(path)
        except ValueError as exc:
            problems[field] = str(exc)
    if spec.poses is not None and spec.masks is not None and not {"poses", "masks"} & set(problems):
        try:
            for field in ("poses", "masks"):
                check_npz_headers(files[field], ROLES[field], limits.max_array_bytes)
            from preprocess.retarget import load_driving  # the job's own reader and its checks

            load_driving(spec.poses, spec.masks, spec.num_frames)
        except ValueError as exc:
            problems["poses/masks"] = str(exc)
    if problems:
        raise JobInputError(problems)
