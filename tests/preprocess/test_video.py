"""The ingest library (preprocess/video.py, preprocess/media.py) without Prefect."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time

import numpy as np
import pytest

from data_schemas import IngestConfig
from data_schemas.workspace import Workspace
from preprocess import media
from preprocess.synthetic import SyntheticSpec, make_synthetic_video, render_clip
from preprocess.video import find_videos, ingest_video, plan_clips, sha256_file, target_size
from tests.helpers.media import make_test_video


def _scores(num: int, cuts=()) -> np.ndarray:
    scores = np.zeros(num)
    scores[list(cuts)] = 0.9
    return scores


def test_plan_without_cuts_is_one_clip():
    assert plan_clips(_scores(100), 25.0, IngestConfig()) == [(0, 100, True)]


def test_plan_cuts_at_scene_changes_and_drops_short_scenes():
    cfg = IngestConfig(min_clip_s=1.0, max_clip_s=20.0)
    # A 10-frame flash between two scenes is too short to keep.
    assert plan_clips(_scores(200, cuts=(50, 60)), 25.0, cfg) == [(0, 50, True), (50, 60, False), (60, 200, True)]


def test_plan_splits_long_scenes_evenly_within_limits():
    cfg = IngestConfig(min_clip_s=1.0, max_clip_s=3.0)
    intervals = plan_clips(_scores(250), 25.0, cfg)
    assert intervals == [(0, 62, True), (62, 125, True), (125, 188, True), (188, 250, True)]
    # With keyframes near the even splits, the splits move onto them (no re-encoding needed).
    snapped = plan_clips(_scores(250), 25.0, cfg, keyframes={0, 50, 60, 120, 190, 240})
    assert snapped == [(0, 60, True), (60, 120, True), (120, 190, True), (190, 250, True)]
    for start, end, _ in intervals + snapped:
        assert cfg.min_clip_s * 25 <= end - start <= cfg.max_clip_s * 25


def test_plan_never_snaps_outside_the_limits():
    cfg = IngestConfig(min_clip_s=1.0, max_clip_s=2.0)
    # The only keyframe near the split would leave a 0.4 s piece: keep the even split.
    assert plan_clips(_scores(75), 25.0, cfg, keyframes={0, 10}) == [(0, 38, True), (38, 75, True)]


def test_split_is_frame_exact_by_copy_and_by_reencoding(tmp_path):
    from preprocess.media import write_video

    frames = render_clip(SyntheticSpec(num_frames=50, num_persons=1, seed=3)).frames
    source = write_video(frames, tmp_path / "source.mp4", fps=25.0)
    whole = tmp_path / "whole.mp4"
    media.normalise(source, whole, fps=25.0, size=(256, 192), crf=12, preset="fast", gop=10, timeout=60)
    keyframes = media.keyframes(whole, 25.0)
    assert {0, 10, 20, 30, 40} <= keyframes
    for name, cuts, reencode in (("copy", [20, 30], None), ("enc", [17, 33], {"vcodec": "libx264"})):
        assert reencode or set(cuts) <= keyframes
        (tmp_path / name).mkdir()
        media.split(whole, tmp_path / name / "%04d.mp4", cuts, 25.0, reencode=reencode, timeout=60)
        parts = sorted((tmp_path / name).iterdir())
        bounds = [0, *cuts, 50]
        assert [media.count_and_check_frames(p)[0] for p in parts] == [b - a for a, b in itertools.pairwise(bounds)]
        for part, start in zip(parts, bounds):
            first = media.read_frames(part, [0])[0].astype(np.float32)
            assert np.abs(first - frames[start]).mean() < 4


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
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(plain),
            "-f",
            "lavfi",
            "-i",
            "sine=duration=2",
            "-c:v",
            "copy",
            "-c:a",
            "aac",
            "-shortest",
            "-metadata:s:v:0",
            "rotate=90",
            str(rotated),
        ],
        check=True,
    )
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
        capture_output=True,
        check=True,
    )
    stream = json.loads(probe.stdout)["streams"]
    assert len(stream) == 1  # audio dropped
    assert (stream[0]["codec_name"], stream[0]["pix_fmt"], stream[0]["avg_frame_rate"]) == ("h264", "yuv420p", "25/1")
    assert sorted(os.listdir(Workspace(tmp_path / "ws").clips)) == [c.clip_id + ".mp4" for c in result.clips]


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


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"Good morning, a text that starts with the TS sync byte" * 4, "not_a_video"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt " * 4, "not_a_video"),
        ((b"\x47" + b"\x00" * 187) * 2, "undecodable"),
        (b"\x00\x00\x00\x18ftypmp42" * 4, "undecodable"),
        (b"\x1aE\xdf\xa3" * 4, "undecodable"),
    ],
)
def test_unopenable_files_are_told_apart_by_their_first_bytes(tmp_path, head, reason):
    (tmp_path / "x.mp4").write_bytes(head)
    with pytest.raises(media.MediaError) as info:
        media.probe(tmp_path / "x.mp4", timeout=10)
    assert info.value.reason == reason and str(tmp_path / "x.mp4") in str(info.value)
