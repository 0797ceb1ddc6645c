"""ffprobe / ffmpeg / decord wrappers.

Untrusted files are only ever touched by ffprobe and ffmpeg, in child processes with a
timeout (their own process group, killed whole on timeout): decoders can hang in native
code or abort on broken streams. decord reads only the clips we encoded ourselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from data_schemas.video import ProbeInfo

# Demuxers that open still images or text: ffprobe "succeeds" on them, but they are no video.
_STILL_FORMATS = {"image2", "tty", "lavfi"}


class MediaError(Exception):
    """ffprobe/ffmpeg could not do its work on a file; ``reason`` is a FailureReason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class MediaTimeout(MediaError):
    def __init__(self, message: str):
        super().__init__("timeout", message)


def input_url(path: Path) -> str:
    """ffmpeg input for a local file: ``file:`` stops names with ':' being read as protocols."""
    return "file:" + os.fspath(Path(path).absolute())


def run_tool(args: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[bytes]:
    """Run an argument list (never a shell) in its own process group, killed whole on timeout."""
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise MediaTimeout(f"{what}: no answer after {timeout:.0f} s, killed") from None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def last_error_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _rate(text: str | None) -> float | None:
    try:
        value = Fraction(text) if text else None
    except (ValueError, ZeroDivisionError):
        return None
    return float(value) if value else None


def _rotation(stream: dict) -> int:
    """Clockwise display rotation: the display matrix side data, else the old ``rotate`` tag."""
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            # The display matrix stores counter-clockwise degrees (ffmpeg prints e.g. -90).
            return int(-float(side["rotation"])) % 360
    tag = stream.get("tags", {}).get("rotate")
    return int(float(tag)) % 360 if tag else 0


def _float(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def probe(path: Path, timeout: float) -> ProbeInfo:
    """Probe a file with ffprobe; raise MediaError with a reason when it is no usable video."""
    args = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", input_url(path)]
    done = run_tool(args, timeout, f"ffprobe {path}")
    if done.returncode != 0:
        raise MediaError(_unopenable_reason(path), f"{path}: cannot be opened as a video ({last_error_line(done.stderr)})")
    info = json.loads(done.stdout.decode("utf-8", "replace") or "{}")
    fmt = info.get("format", {})
    streams = info.get("streams", [])
    container = fmt.get("format_name", "")
    if container in _STILL_FORMATS or container.endswith("_pipe"):
        raise MediaError("not_a_video", f"{path}: not a video but {container!r} content")
    videos = [s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")]
    if not videos:
        kinds = sorted({s.get("codec_type", "?") for s in streams}) or ["none"]
        raise MediaError("no_video_stream", f"{path}: no video stream (streams: {', '.join(kinds)})")
    video = videos[0]
    avg_fps, r_fps = _rate(video.get("avg_frame_rate")), _rate(video.get("r_frame_rate"))
    nb_frames = video.get("nb_frames")
    return ProbeInfo(
        container=container,
        codec=video.get("codec_name", "unknown"),
        width=int(video.get("width") or 0),
        height=int(video.get("height") or 0),
        rotation=_rotation(video),
        avg_fps=avg_fps,
        r_fps=r_fps,
        # A 1 % tolerance: containers round rates (e.g. 30000/1001 against 2997/100).
        variable_frame_rate=bool(avg_fps and r_fps and abs(avg_fps - r_fps) > 0.01 * r_fps),
        duration_s=_float(video.get("duration")) or _float(fmt.get("duration")),
        num_frames=int(nb_frames) if nb_frames and str(nb_frames).isdigit() else None,
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
    )


# Leading bytes of containers that hold video. A file that starts like one but cannot be
# opened is a damaged video (undecodable), anything else is not a video at all.
_VIDEO_MAGIC = (b"\x1aE\xdf\xa3", b"RIFF", b"\x00\x00\x01\xba", b"FLV", b"0&\xb2u", b"OggS")


def _unopenable_reason(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip") or head.startswith(_VIDEO_MAGIC):
        return "undecodable"
    if head[:1] == b"\x47" and len(head) >= 1:  # MPEG-TS sync byte
        return "undecodable"
    return "not_a_video"


def scan_scenes(path: Path, timeout: float) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode every frame once: (frame times from 0 in s, scene scores, decoder errors).

    This full decode is also the validation of an untrusted file. Frames are scaled to a
    thumbnail first, so the scene score costs little beside the decoding itself.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scan-") as tmp:
        scores_file = Path(tmp) / "scores.txt"
        # Escape ':' and '\\' for the filter graph parser.
        escaped = os.fspath(scores_file).replace("\\", "\\\\").replace(":", "\\:")
        stream = (
            ffmpeg.input(input_url(path))
            .video.filter("setpts", "PTS-STARTPTS")
            .filter("scale", 64, -2)
            .filter("select", "gte(scene,0)")
            .filter("metadata", "print", key="lavfi.scene_score", file=escaped)
        )
        args = stream.output("-", format="null").global_args("-nostdin", "-v", "error").compile()
        done = run_tool(args, timeout, f"decoding {path}")
        text = scores_file.read_text() if scores_file.exists() else ""
    times, scores = _parse_scores(text)
    errors = done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0 and not errors:
        errors = f"ffmpeg exited with status {done.returncode}"
    return times, scores, errors


def _parse_scores(text: str) -> tuple[np.ndarray, np.ndarray]:
    times: list[float] = []
    scores: list[float] = []
    for line in text.splitlines():
        if line.startswith("frame:"):
            field = line.split("pts_time:")[-1].strip()
            times.append(_float(field) if _float(field) is not None else (times[-1] if times else 0.0))
            scores.append(0.0)
        elif line.startswith("lavfi.scene_score=") and scores:
            scores[-1] = _float(line.split("=", 1)[1]) or 0.0
    return np.asarray(times, dtype=np.float64), np.asarray(scores, dtype=np.float64)


def normalise_segments(
    path: Path,
    out_pattern: Path,
    cut_times: list[float],
    *,
    fps: float,
    size: tuple[int, int],
    crf: int,
    preset: str,
    timeout: float,
) -> None:
    """Encode a whole file once into segments split exactly at ``cut_times`` (seconds from 0).

    Keyframes are forced at the cuts so the segment muxer splits on the right frame. ffmpeg
    applies the rotation (autorotate) before our filters; audio and metadata are dropped.
    """
    width, height = size
    video = (
        ffmpeg.input(input_url(path))
        .video.filter("setpts", "PTS-STARTPTS")
        .filter("fps", fps=fps)
        .filter("scale", width, height, flags="bicubic")
        .filter("setsar", 1)
    )
    times = ",".join(f"{t:.6f}" for t in cut_times)
    options = dict(
        vcodec="libx264",
        pix_fmt="yuv420p",
        crf=crf,
        preset=preset,
        format="segment",
        reset_timestamps=1,
        segment_format="mp4",
        map_metadata=-1,
        segment_format_options="movflags=+faststart",
    )
    if cut_times:
        options.update(force_key_frames=times, segment_times=times)
    else:
        options.update(segment_time=10**9)  # one segment
    args = video.output(os.fspath(out_pattern), **options).global_args("-nostdin", "-v", "error", "-y").compile()
    done = run_tool(args, timeout, f"normalising {path}")
    if done.returncode != 0:
        raise MediaError("undecodable", f"{path}: ffmpeg could not normalise it ({last_error_line(done.stderr)})")


def count_and_check_frames(clip: Path, num_samples: int = 3) -> tuple[int, int, int]:
    """Open one of OUR clips with decord: (frames, width, height), reading a few frames."""
    import decord

    reader = decord.VideoReader(os.fspath(clip), num_threads=1)
    n = len(reader)
    if n:
        picks = np.unique(np.linspace(0, n - 1, num=min(num_samples, n)).round().astype(int))
        frames = reader.get_batch(picks.tolist()).asnumpy()
        height, width = frames.shape[1:3]
    else:
        width = height = 0
    return n, width, height


def read_frames(clip: Path, indices: list[int] | None = None) -> np.ndarray:
    """Frames of one of OUR normalised clips as uint8 [T, H, W, 3] RGB (all when indices is None)."""
    import decord

    reader = decord.VideoReader(os.fspath(clip), num_threads=2)
    picks = list(range(len(reader))) if indices is None else list(indices)
    return reader.get_batch(picks).asnumpy()
