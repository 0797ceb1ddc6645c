"""Media made with ffmpeg: test videos, and a folder of good and bad input files with the
outcome each must get."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from preprocess.synthetic import SyntheticSpec, make_synthetic_video


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly with an argument list; fail the test with its message."""
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()


def make_test_video(
    path: Path, *, size: str = "160x120", rate: int = 25, seconds: float = 2.0, faststart=True, extra=()
):
    """A busy test-pattern H.264 video."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *extra]
    if faststart:
        args += ["-movflags", "+faststart"]
    ffmpeg(*args, str(path))
    return path


# name -> (status, reason or None)
EXPECTED: dict[str, tuple[str, str | None]] = {
    "good_two_people.mp4": ("ok", None),
    "good_three_people_cut.mp4": ("ok", None),
    "zero_bytes.mp4": ("failed", "not_a_video"),
    "text.mp4": ("failed", "not_a_video"),
    "image.mov": ("failed", "not_a_video"),
    "audio_only.mp4": ("failed", "no_video_stream"),
    "truncated.mp4": ("failed", "undecodable"),
    "no_moov.mp4": ("failed", "undecodable"),
    "one_frame.mp4": ("failed", "too_short"),
    "odd_size_321x241.mkv": ("ok", None),
    "variable_rate.mp4": ("ok", None),
    "rotated_90.mp4": ("ok", None),
    "tänzer – ダンス.mp4": ("ok", None),
    "-dash:colon name.mp4": ("ok", None),
    "sub/copy of two people.MP4": ("duplicate", None),
    "loop.mp4": ("failed", "symlink_loop"),
    "dangling.mp4": ("failed", "unreadable"),
}

# Clips each ok file must give, and their size.
CLIPS: dict[str, list[tuple[int, int]]] = {
    "good_two_people.mp4": [(256, 192)],
    "good_three_people_cut.mp4": [(256, 192), (256, 192)],
    "odd_size_321x241.mkv": [(320, 240)],
    "variable_rate.mp4": [(160, 120)],
    "rotated_90.mp4": [(120, 160)],
    "tänzer – ダンス.mp4": [(160, 120)],
    "-dash:colon name.mp4": [(160, 120)],
}


def build_media_folder(root: Path) -> Path:
    """Create every case of EXPECTED under ``root`` (plus a directory symlink loop)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    good, _ = make_synthetic_video(SyntheticSpec(num_frames=40, num_persons=2, seed=1), root, "good_two_people")
    make_synthetic_video(
        SyntheticSpec(num_frames=60, num_persons=3, seed=2, scene_cut_frames=(30,)), root, "good_three_people_cut"
    )
    for gt in root.glob("*.gt.npz"):  # ground truth is not input here
        gt.unlink()
    (root / "zero_bytes.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1", str(root / "image.png"))
    os.replace(root / "image.png", root / "image.mov")
    ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", str(root / "audio_only.mp4"))

    whole = make_test_video(root / "whole.mp4", seconds=4.0)
    data = whole.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    whole.unlink()
    tail_moov = make_test_video(root / "moov_at_end.mp4", seconds=2.0, faststart=False)
    data = tail_moov.read_bytes()
    (root / "no_moov.mp4").write_bytes(data[: data.rindex(b"moov") - 4])
    tail_moov.unlink()

    make_test_video(root / "one_frame.mp4", extra=("-frames:v", "1"))
    make_test_video(root / "odd_size_321x241.mkv", size="321x241", faststart=False)
    # Variable frame rate: 1 s at 25 fps, then 1 s at 10 fps, timestamps kept as they are.
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=25:duration=1",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=10:duration=1",
        "-filter_complex",
        "[0:v][1:v]concat=n=2:v=1[v]",
        "-map",
        "[v]",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        str(root / "variable_rate.mp4"),
    )
    plain = make_test_video(root / "plain.mp4")
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(root / "rotated_90.mp4"))
    os.replace(plain, root / "tänzer – ダンス.mp4")
    make_test_video(root / "-dash:colon name.mp4", seconds=1.5)
    (root / "sub" / "copy of two people.MP4").write_bytes(good.read_bytes())
    os.symlink("loop.mp4", root / "loop.mp4")
    os.symlink("missing-target.mp4", root / "dangling.mp4")
    os.symlink("..", root / "sub" / "back-to-root")  # a directory loop: walked once
    return root
