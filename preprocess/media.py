"""ffprobe / ffmpeg / decord wrappers.

Untrusted files are only ever touched by ffprobe and ffmpeg, in child processes with a
timeout (their own process group, killed whole on timeout): decoders can hang in native
code or abort on broken streams. decord reads only the clips we encoded ourselves.

Two kinds of failure are told apart. ``MediaError`` is a verdict about the file's content
(not a video, undecodable, ...), safe to cache. A timeout, an I/O error, a full disk or a
tool killed from outside says nothing about the content: it raises an ``OSError``
(``MediaTimeout`` is a ``TimeoutError``), which the tasks retry and never cache.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from data_schemas.atomic import atomic_path
from data_schemas.video import ProbeInfo

# Demuxers that open still images or text: ffprobe "succeeds" on them, but they are no video.
_STILL_FORMATS = {"image2", "tty", "lavfi"}


class MediaError(Exception):
    """ffprobe/ffmpeg could not do its work on a file; ``reason`` is a FailureReason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class MediaTimeout(MediaError, TimeoutError):
    """No answer in time: a slow disk or a loaded host as much as a hostile file, so a passing
    failure (a TimeoutError), not a verdict."""

    def __init__(self, message: str):
        super().__init__("timeout", message)


# What ffmpeg prints (strerror) when the machine, not the file, failed: a rerun may succeed.
_ENVIRONMENT_ERRNOS = (
    errno.EIO,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.ESTALE,
    errno.ETIMEDOUT,
    errno.ENOTCONN,
)


def raise_for_environment(done: subprocess.CompletedProcess[bytes], what: str) -> None:
    """Raise an OSError when a tool failed because of the machine: an errno of
    _ENVIRONMENT_ERRNOS in its messages, or killed by SIGKILL (the OOM killer, an operator).
    Other signals (a decoder crashing on a crafted file) are left to the caller's verdict."""
    text = done.stderr.decode("utf-8", "replace")
    for code in _ENVIRONMENT_ERRNOS:
        message = os.strerror(code)
        line = next((line.strip() for line in text.splitlines() if message in line), None)
        if line is not None:
            raise OSError(code, f"{what}: {line}")
    if done.returncode == -signal.SIGKILL:
        raise OSError(errno.EINTR, f"{what}: killed by SIGKILL from outside (out of memory?)")


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
        raise_for_environment(done, f"ffprobe {path}")
        raise MediaError(
            _unopenable_reason(path), f"{path}: cannot be opened as a video ({last_error_line(done.stderr)})"
        )
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


# How video containers begin: Matroska/WebM, MPEG-PS, FLV, ASF, Ogg; AVI is a RIFF of type
# "AVI "; ISO-BMFF (mp4, mov) starts with one of a few box names; MPEG-TS repeats its sync
# byte every 188 bytes. A file that begins like one but cannot be opened is a damaged video
# (undecodable); anything else is no video at all.
_VIDEO_MAGIC = (b"\x1aE\xdf\xa3", b"\x00\x00\x01\xba", b"FLV", b"0&\xb2u", b"OggS")
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


def _unopenable_reason(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(189)
    looks_like_video = (
        head.startswith(_VIDEO_MAGIC)
        or head[4:8] in _ISO_BOXES
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or (len(head) == 189 and head[0] == head[188] == 0x47)
    )
    return "undecodable" if looks_like_video else "not_a_video"


# x264 options of every clip we encode. CAVLC instead of CABAC entropy coding: the same
# pictures at the same CRF for ~17 % more bytes, and ~30 % less decoding work in the training
# loader, which decodes the frames of every sample again in every epoch.
X264_DECODE_OPTIONS: dict[str, str] = {"coder": "cavlc"}


@dataclass(frozen=True)
class DecodeReport:
    """What the normalising decode said about an untrusted file."""

    errors: tuple[str, ...]  # error-level messages of the decode (demuxer, decoder), in order
    lost: int  # packets the decoder failed on (no frame)
    corrupt: int  # frames decoded but flagged corrupt, or reported as concealed

    @property
    def damaged_frames(self) -> int:
        return self.lost + self.corrupt


# Lines of ``-loglevel level+verbose``: "[h264 @ 0x55...] [error] message" or "[error] message".
_LOG_LINE = re.compile(
    r"^(?:\[[^\]]*\] )?\[(?P<level>panic|fatal|error|warning|info|verbose|debug|trace)\] ?(?P<text>.*)$"
)
_REPEATED = re.compile(r"Last message repeated (?P<times>\d+) times")


# Per-frame messages: ffmpeg's own, once per packet the decoder failed on and once per frame
# it flagged corrupt; the h264/hevc/mpeg decoders', once per picture decoded with concealment.
# (Counting packets against frames does not work: edit lists discard packets legitimately.)
_FRAME_MESSAGES = {
    "lost": "Error while decoding stream",
    "flagged": "corrupt decoded frame in stream",
    "concealed": "concealing ",
}


def parse_decode_log(stderr: str) -> DecodeReport:
    """Read the decode's error messages and count its damaged frames from ffmpeg's log."""
    errors: list[str] = []
    counts = dict.fromkeys(_FRAME_MESSAGES, 0)
    last: str | None = None  # the counter the previous line added to, for folded repeats
    for line in stderr.splitlines():
        if repeated := _REPEATED.search(line):  # ffmpeg folds identical lines into one
            if last is not None:
                counts[last] += int(repeated["times"])
            continue
        match = _LOG_LINE.match(line.strip())
        if match is None:
            continue
        level, text = match["level"], match["text"].strip()
        last = next((kind for kind, start in _FRAME_MESSAGES.items() if text.startswith(start) or start in text), None)
        if last is not None:
            counts[last] += 1
        if level in ("panic", "fatal", "error") and text:
            errors.append(text)
    # A concealed picture is usually flagged corrupt as well: count each frame once.
    return DecodeReport(tuple(errors), counts["lost"], max(counts["flagged"], counts["concealed"]))


def normalise(
    path: Path,
    out: Path,
    *,
    fps: float,
    size: tuple[int, int],
    crf: int,
    preset: str,
    gop: int,
    timeout: float,
) -> tuple[np.ndarray, DecodeReport]:
    """Decode an untrusted file ONCE into a normalised H.264 mp4 plus per-frame scene scores.

    One filter graph: timestamps from 0 -> fixed fps -> scaled -> split into the encoder and
    a 64 px thumbnail branch that scores scene changes. ffmpeg applies the rotation first
    (autorotate). x264 places an IDR frame at every scene change it sees (min-keyint 1) and
    at least every ``gop`` frames, so clips can later be cut without re-encoding; it encodes
    with X264_DECODE_OPTIONS. The log is read at the verbose level, each line tagged with
    its level, for the decode's errors and its packet and frame counts (``DecodeReport``).
    Returns (scene score of each output frame, the decode's report); raises OSError when the
    machine failed (see raise_for_environment).
    """

    width, height = size
    with tempfile.TemporaryDirectory(prefix="scan-") as tmp:
        scores_file = Path(tmp) / "scores.txt"
        frames = (
            ffmpeg.input(input_url(path))
            .video.filter("setpts", "PTS-STARTPTS")
            .filter("fps", fps=fps)
            .filter("scale", width, height, flags="bicubic")
            .filter("setsar", 1)
            .split()
        )
        scores = (
            frames[1]
            .filter("scale", 64, -2)
            .filter("select", "gte(scene,0)")
            .filter("metadata", "print", key="lavfi.scene_score", file=os.fspath(scores_file))
        )
        encoded = frames[0].output(
            os.fspath(out),
            vcodec="libx264",
            pix_fmt="yuv420p",
            crf=crf,
            preset=preset,
            g=gop,
            keyint_min=1,
            movflags="+faststart",
            map_metadata=-1,
            **X264_DECODE_OPTIONS,
        )
        graph = ffmpeg.merge_outputs(encoded, scores.output("-", format="null"))
        args = graph.global_args("-nostdin", "-nostats", "-loglevel", "level+verbose", "-y").compile()
        done = run_tool(args, timeout, f"normalising {path}")
        text = scores_file.read_text() if scores_file.exists() else ""
    raise_for_environment(done, f"normalising {path}")
    report = parse_decode_log(done.stderr.decode("utf-8", "replace"))
    if done.returncode != 0 and not report.errors:
        report = DecodeReport((f"ffmpeg exited with status {done.returncode}",), report.lost, report.corrupt)
    return _parse_scores(text), report


def _parse_scores(text: str) -> np.ndarray:
    scores: list[float] = []
    for line in text.splitlines():
        if line.startswith("frame:"):
            scores.append(0.0)
        elif line.startswith("lavfi.scene_score=") and scores:
            scores[-1] = _float(line.split("=", 1)[1]) or 0.0
    return np.asarray(scores, dtype=np.float64)


def keyframes(clip: Path, fps: float, timeout: float = 60.0) -> set[int]:
    """Frame indices of the keyframes of one of OUR constant-rate clips (packets only, no decoding)."""
    args = [
        "ffprobe",
        "-v",
        "error",
        "-select_streams",
        "v:0",
        "-show_entries",
        "packet=pts_time,flags",
        "-of",
        "csv=p=0",
        input_url(clip),
    ]
    done = run_tool(args, timeout, f"listing keyframes of {clip}")
    if done.returncode != 0:
        raise_for_environment(done, f"listing keyframes of {clip}")
        raise MediaError("undecodable", f"{clip}: {last_error_line(done.stderr)}")
    found = set()
    for line in done.stdout.decode().splitlines():
        pts, _, flags = line.partition(",")
        if "K" in flags and _float(pts) is not None:
            found.add(round(float(pts) * fps))
    return found


def split(clip: Path, out_pattern: Path, cut_frames: list[int], fps: float, *, reencode: dict | None, timeout: float):
    """Split one of OUR clips at frame indices: by stream copy when every cut is a keyframe,
    else (``reencode`` = encoder options) by encoding again with keyframes forced at the cuts
    (with libx264: X264_DECODE_OPTIONS unless ``reencode`` sets them otherwise)."""
    # Half a frame early: the segment muxer cuts at the first keyframe at or after the time.
    times = ",".join(f"{(f - 0.5) / fps:.6f}" for f in cut_frames)
    if reencode is None:
        codec = dict(vcodec="copy")
    else:
        defaults = X264_DECODE_OPTIONS if reencode.get("vcodec") == "libx264" else {}
        codec = dict(defaults, **reencode, force_key_frames=times)
    args = (
        ffmpeg.input(input_url(clip))
        .output(
            os.fspath(out_pattern),
            format="segment",
            segment_times=times,
            reset_timestamps=1,
            segment_format="mp4",
            segment_format_options="movflags=+faststart",
            map_metadata=-1,
            **codec,
        )
        .global_args("-nostdin", "-v", "error", "-y")
        .compile()
    )
    done = run_tool(args, timeout, f"splitting {clip}")
    if done.returncode != 0:
        raise_for_environment(done, f"splitting {clip}")
        raise MediaError("undecodable", f"{clip}: could not split ({last_error_line(done.stderr)})")


def count_and_check_frames(clip: Path) -> tuple[int, int, int]:
    """Open one of OUR clips with decord: (frames, width, height). The first and last frames
    are decoded, so a container that over-reports its length is caught here, not in training."""
    import decord

    reader = decord.VideoReader(os.fspath(clip), num_threads=1)
    n = len(reader)
    if not n:
        return 0, 0, 0
    frames = reader.get_batch(sorted({0, n - 1})).asnumpy()
    return n, frames.shape[2], frames.shape[1]


# ---- our own videos: the project's one mp4 writer (samples, imported clips, generated outputs)


def _ffmpeg_exe() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg executable not found on PATH")
    return exe


def write_video(frames: np.ndarray, path: Path, fps: float, crf: int = 12) -> Path:
    """Encode RGB frames (uint8 [T,H,W,3], even H/W) to an H.264/yuv420p mp4, atomically.

    Frames are piped raw to an ffmpeg subprocess; the output appears under its
    final name only after ffmpeg succeeded. Raises ValueError for bad inputs and
    RuntimeError when ffmpeg fails (its stderr tail is included).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0,H,W,3], got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {w}x{h}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    if not 0 <= crf <= 51:  # libx264 itself accepts any float and silently clamps
        raise ValueError(f"crf must be in 0..51, got {crf}")
    exe = _ffmpeg_exe()
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-framerate",
        repr(float(fps)),
        "-i",
        "pipe:0",
        "-an",
        "-c:v",
        "libx264",
        "-crf",
        str(crf),
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
    ]
    with atomic_path(path) as tmp, tempfile.TemporaryFile() as err:
        # stderr goes to a file: a full, unread stderr pipe could deadlock the writer.
        proc = subprocess.Popen([*cmd, str(tmp)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        assert proc.stdin is not None
        try:
            for frame in frames:
                proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            pass  # ffmpeg died early; its exit code and stderr say why
        except BaseException:
            proc.kill()  # e.g. KeyboardInterrupt: don't let ffmpeg finish a half clip
            raise
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            rc = proc.wait()
        if rc != 0:
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"ffmpeg failed (exit {rc}) writing {path}: {tail}")
    return path


def read_frames(clip: Path, indices: list[int] | None = None) -> np.ndarray:
    """Frames of one of OUR normalised clips as uint8 [T, H, W, 3] RGB (all when indices is None)."""
    import decord

    reader = decord.VideoReader(os.fspath(clip), num_threads=2)
    picks = list(range(len(reader))) if indices is None else list(indices)
    return reader.get_batch(picks).asnumpy()
