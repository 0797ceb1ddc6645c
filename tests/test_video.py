"""The ingest library (preprocess/video.py, preprocess/media.py) without Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

from data_schemas import IngestConfig
from preprocess import media
from preprocess.synthetic import SyntheticSpec, make_synthetic_video, render_clip
from preprocess.video import find_videos, ingest_video, plan_clips, sha256_file, target_size
from tests.conftest import make_test_video


def _frames(num: int, fps: float = 25.0):
    return np.arange(num) / fps


def test_plan_without_cuts_is_one_clip():
    cfg = IngestConfig()
    times, scores = _frames(100), np.zeros(100)
    assert plan_clips(times, scores, 4.0, cfg) == ([], [True])


def test_plan_cuts_at_scene_changes_and_drops_short_scenes():
    cfg = IngestConfig(min_clip_s=1.0, max_clip_s=20.0)
    times, scores = _frames(200), np.zeros(200)
    scores[[50, 60]] = 0.9  # a 0.4 s flash between two scenes
    cuts, keep = plan_clips(times, scores, 8.0, cfg)
    assert cuts == pytest.approx([2.0 - 0.02, 2.4 - 0.02])
    assert keep == [True, False, True]


def test_plan_splits_long_scenes_evenly_within_limits():
    cfg = IngestConfig(min_clip_s=1.0, max_clip_s=3.0)
    cuts, keep = plan_clips(_frames(250), np.zeros(250), 10.0, cfg)
    assert cuts == pytest.approx([2.5, 5.0, 7.5]) and keep == [True] * 4
    bounds = [0.0, *cuts, 10.0]
    assert all(cfg.min_clip_s <= b - a <= cfg.max_clip_s for a, b in zip(bounds, bounds[1:]))


def test_plan_merges_cuts_closer_than_two_frames():
    cfg = IngestConfig()
    times, scores = _frames(100), np.zeros(100)
    scores[[40, 41]] = 0.9  # two "cuts" on consecutive frames would make an empty segment
    cuts, keep = plan_clips(times, scores, 4.0, cfg)
    assert len(cuts) == len(keep) - 1 == 1


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((321, 241), 1024, (320, 240)), ((1920, 1080), 1024, (1024, 576)), ((1080, 1920), 832, (468, 832))],
)
def test_target_size_is_even_and_bounded(size, max_side, expected):
    assert target_size(*size, max_side) == expected


def test_probe_reports_rotation_rate_and_audio(tmp_path):
    plain = make_test_video(tmp_path / "p.mp4", extra=("-f", "mp4"))
    rotated = tmp_path / "r.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(plain), "-f", "lavfi", "-i", "sine=duration=2", "-c:v", "copy",
         "-c:a", "aac", "-shortest", "-metadata:s:v:0", "rotate=90", str(rotated)],
        check=True,
    )  # fmt: skip
    info = media.probe(rotated, timeout=10)
    assert info.rotation in (90, 270) and info.display_size == (120, 160)
    assert info.has_audio and info.codec == "h264" and info.avg_fps == 25.0 and not info.variable_frame_rate
    assert media.probe(plain, timeout=10).rotation == 0


def test_run_tool_kills_a_hanging_child():
    start = time.monotonic()
    with pytest.raises(media.MediaTimeout, match="no answer"):
        media.run_tool(["sleep", "30"], timeout=0.5, what="sleeping")
    assert time.monotonic() - start < 5


def test_clips_are_cut_on_the_scene_change_and_normalised(tmp_path):
    spec = SyntheticSpec(num_frames=60, num_persons=3, seed=2, scene_cut_frames=(30,))
    video, _ = make_synthetic_video(spec, tmp_path / "in", "cut")
    cfg = IngestConfig(fps=25.0)
    result = ingest_video(video, sha256_file(video), cfg, tmp_path / "ws")
    assert result.status == "ok", result.error
    assert [c.num_frames for c in result.clips] == [30, 30]
    source = render_clip(spec).frames.astype(np.float32)
    for clip, first_source_frame in zip(result.clips, (0, 30)):
        frames = media.read_frames(tmp_path / "ws" / clip.path).astype(np.float32)
        assert frames.shape == (30, 192, 256, 3)
        # The clip's first frame is the scene's first frame, not its neighbour across the cut
        # (for the first clip, "across the cut" is the other scene's last frame).
        errors = [np.abs(frames[0] - source[i]).mean() for i in (first_source_frame - 1, first_source_frame)]
        assert errors[1] < 4 < errors[0]
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(tmp_path / "ws" / result.clips[0].path)],
        capture_output=True, check=True,
    )  # fmt: skip
    stream = json.loads(probe.stdout)["streams"]
    assert len(stream) == 1  # audio dropped
    assert (stream[0]["codec_name"], stream[0]["pix_fmt"], stream[0]["avg_frame_rate"]) == ("h264", "yuv420p", "25/1")
    assert sorted(os.listdir(tmp_path / "ws" / "clips")) == [c.clip_id + ".mp4" for c in result.clips]


def test_fps_and_max_side_are_applied(tmp_path):
    video = make_test_video(tmp_path / "big.mp4", size="640x360", rate=30, seconds=2.0)
    result = ingest_video(video, sha256_file(video), IngestConfig(fps=10, max_side=320), tmp_path / "ws")
    (clip,) = result.clips
    assert (clip.width, clip.height, clip.num_frames, clip.fps) == (320, 180, 20, 10.0)


def test_find_videos_walks_once_and_reports_bad_links(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.MOV").write_bytes(b"1")
    (tmp_path / "notes.txt").write_text("skip me")
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink("self.mp4", tmp_path / "self.mp4")
    found = find_videos(tmp_path, IngestConfig().extensions)
    assert [(f.path.relative_to(tmp_path).as_posix(), f.reason and f.reason.value) for f in found] == [
        ("a/x.MOV", None),
        ("self.mp4", "symlink_loop"),
    ]
