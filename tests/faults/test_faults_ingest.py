"""Ingest's fault catalogue (bench/fault_cases/ingest.py builds the inputs): passing failures
are retried and never cached, a mid-file corruption is rejected with its damaged frames, a
container's claims are not believed, extreme sizes are refused, workspaces grow folder by
folder and shrink only by `remove`, and a long clip streams through pose and segmentation."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.fault_cases.ingest import (
    EXTREME_SIZES,
    PROFILE,
    calls,
    fake_ffprobe,
    good_video,
    huge_declared_video,
    mid_corrupt_video,
    one_pixel_video,
    overclaiming_avi,
    thin_video,
    two_folders,
)
from data_schemas import ClipRecord, IngestConfig, VideoRecord, load_config, read_records
from data_schemas.video import FailureReason, VideoStatus
from data_schemas.workspace import Workspace
from preprocess import media
from preprocess.video import (
    FoundFile,
    ingest_video,
    merge_manifests,
    read_videos_manifest,
    sha256_file,
    video_record,
)

REPO = Path(__file__).resolve().parents[2]


def run_ingest(folder: Path, workspace: Path, config: IngestConfig = IngestConfig()):
    from flows.ingest import ingest

    return ingest(folder, workspace, config)


def rows_by_name(workspace: Path) -> dict[str, VideoRecord]:
    return {Path(r.path).name: r for r in read_records(Workspace(workspace).videos_manifest, VideoRecord)}


# ---- case 2: a passing failure is no verdict --------------------------------------------


@pytest.mark.parametrize(("behaviour", "reason"), [("hang", "timeout"), ("eio", "io_error")])
def test_a_failing_probe_is_retried_never_cached_and_a_rerun_processes_the_file(
    tmp_path, monkeypatch, prefect_api, behaviour, reason
):
    from tasks.common import result_storage

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    video = good_video(folder / "good.mp4")
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE)
    config = load_config(profile)
    fake = fake_ffprobe(tmp_path / "fake", behaviour)
    healthy_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{healthy_path}")

    summary = run_ingest(folder, workspace, config.ingest)
    row = rows_by_name(workspace)["good.mp4"]
    assert (row.status, row.reason) == (VideoStatus.failed, FailureReason(reason)) and str(video) in row.error
    assert "the next run tries again" in row.error
    assert (summary.num_failed, summary.num_passing, summary.num_clips) == (1, 1, 0)
    assert calls(fake) == 3  # the first attempt and two retries
    key = f"ingest-{sha256_file(video)}"
    stored = lambda: [p for p in result_storage(workspace).glob("*") if p.name.startswith(key)]
    assert stored() == []  # nothing a rerun could serve

    monkeypatch.setenv("PATH", healthy_path)
    summary = run_ingest(folder, workspace, config.ingest)
    row = rows_by_name(workspace)["good.mp4"]
    assert (row.status, row.reason, summary.num_passing) == (VideoStatus.ok, None, 0)
    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    assert len(clips) == 1 and (workspace / clips[0].path).is_file()
    assert len(stored()) == 1  # the verdict about the content is cached now
    assert calls(fake) == 3


def test_a_full_disk_under_ffmpeg_raises_instead_of_a_verdict():
    done = subprocess.CompletedProcess(
        [], 1, b"", b"[error] Error writing trailer of out.mp4: No space left on device\n"
    )
    with pytest.raises(OSError) as info:
        media.raise_for_environment(done, "normalising x.mp4")
    assert info.value.errno == 28 and "normalising x.mp4" in str(info.value)
    killed = subprocess.CompletedProcess([], -9, b"", b"")
    with pytest.raises(OSError, match="SIGKILL"):
        media.raise_for_environment(killed, "normalising x.mp4")
    media.raise_for_environment(subprocess.CompletedProcess([], -11, b"", b""), "a decoder crash is about the file")
    assert isinstance(media.MediaTimeout("x"), TimeoutError)


# ---- case 3 and the container's claims ---------------------------------------------------


def test_a_video_with_random_bytes_in_its_middle_is_rejected_with_its_damaged_frames(tmp_path):
    video = mid_corrupt_video(tmp_path / "in" / "corrupt.mp4")
    result = ingest_video(video, sha256_file(video), IngestConfig(), tmp_path / "ws")
    assert (result.status, result.reason) == (VideoStatus.failed, FailureReason.undecodable)
    assert result.damaged_frames and result.damaged_frames > 0 and result.num_frames == 100
    assert str(video) in result.error and "damaged frame(s)" in result.error and "only a clean decode" in result.error
    assert list(Workspace(tmp_path / "ws").clips.iterdir()) == []
    record = video_record(FoundFile(video, video.stat().st_size), "x", result)
    assert record.damaged_frames == result.damaged_frames and record.num_frames == 100


def test_the_decode_log_counts_each_damaged_frame_once():
    log = """[h264 @ 0x1] [error] Invalid NAL unit size (-1 > 12).
[error] Error while decoding stream #0:0: Invalid data found when processing input
    Last message repeated 2 times
[h264 @ 0x1] [info] concealing 73 DC, 73 AC, 73 MV errors in P frame
[warning] file:x.ts: corrupt decoded frame in stream 0
[h264 @ 0x1] [info] concealing 9 DC, 9 AC, 9 MV errors in P frame
[warning] file:x.ts: corrupt decoded frame in stream 0
[verbose]   Input stream #0:0 (video): 100 packets read (1 bytes); 97 frames decoded;
[warning] Packet corrupt (stream = 0, dts = 4).
"""
    report = media.parse_decode_log(log)
    assert (report.lost, report.corrupt, report.damaged_frames) == (3, 2, 5)
    assert report.errors == (
        "Invalid NAL unit size (-1 > 12).",
        "Error while decoding stream #0:0: Invalid data found when processing input",
    )
    assert media.parse_decode_log("[verbose] fine\n[info] frame=  100\n").damaged_frames == 0


def test_a_container_that_claims_ten_times_its_frames_is_not_believed(tmp_path):
    video = overclaiming_avi(tmp_path / "in" / "claims500.avi")
    assert media.probe(video, timeout=10).num_frames == 500
    result = ingest_video(video, sha256_file(video), IngestConfig(), tmp_path / "ws")
    assert result.status == VideoStatus.ok and (result.num_frames, result.damaged_frames) == (50, 0), result
    assert sum(c.num_frames for c in result.clips) == 50
    for clip in result.clips:  # the clips hold what the decode gave: decord finds as many frames
        assert media.count_and_check_frames(tmp_path / "ws" / clip.path)[0] == clip.num_frames
    record = video_record(FoundFile(video, video.stat().st_size), "x", result)
    assert (record.claimed_frames, record.num_frames) == (500, 50)


@pytest.mark.parametrize("make", [thin_video, one_pixel_video, huge_declared_video], ids=list(EXTREME_SIZES))
def test_extreme_picture_sizes_are_refused_with_a_reason(tmp_path, make):
    name = {
        thin_video: "thin_2x4000.mp4",
        one_pixel_video: "one_pixel.mkv",
        huge_declared_video: "declares_16000x16000.mp4",
    }[make]
    video = make(tmp_path / "in" / name)
    result = ingest_video(video, sha256_file(video), IngestConfig(), tmp_path / "ws")
    assert (result.status, result.reason) == (VideoStatus.failed, FailureReason(EXTREME_SIZES[name]))
    assert str(video) in result.error and ("px on a side" in result.error or "exceeds" in result.error), result.error
    assert result.damaged_frames is None  # refused before any decode


# ---- case 10: workspaces grow, and shrink only on request --------------------------------


def test_a_second_folder_adds_to_the_workspace_and_the_shards_hold_both(tmp_path, prefect_api):
    from data_schemas.config import ShardConfig
    from data_schemas.pose import PoseRecord
    from preprocess.shards import write_shards

    week1, week2 = two_folders(tmp_path)
    thin_video(week1 / "thin.mp4")  # refused; the batch goes on
    workspace = tmp_path / "ws"
    run_ingest(week1, workspace)
    summary = run_ingest(week2, workspace)

    rows = {
        Path(r.path).relative_to(tmp_path).as_posix(): r
        for r in read_records(Workspace(workspace).videos_manifest, VideoRecord)
    }
    assert {name: (r.status.value, r.folder) for name, r in rows.items()} == {
        "week1/a.mp4": ("ok", str(week1)),
        "week1/b.mp4": ("ok", str(week1)),
        "week1/thin.mp4": ("failed", str(week1)),
        "week2/c.mp4": ("ok", str(week2)),
        "week2/copy of a.mp4": ("duplicate", str(week2)),
    }
    assert rows["week2/copy of a.mp4"].duplicate_of == str(
        week1 / "a.mp4"
    )  # present before: a duplicate, not a replacement
    assert (summary.num_files, summary.num_ok, summary.num_duplicates, summary.num_sources) == (2, 1, 1, 5)
    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    assert {c.source_path for c in clips} == {str(week1 / "a.mp4"), str(week1 / "b.mp4"), str(week2 / "c.mp4")}
    assert summary.num_clips == len(clips) == 3
    pose_and_mask_every_clip(workspace)
    shards = write_shards(workspace, ShardConfig(val_fraction=0.0))
    assert shards.num_samples == 3 and {s.source_sha256 for s in shard_index(workspace)} == {
        c.source_sha256 for c in clips
    }

    # Last week's folder again: nothing of this week's is dropped, nothing changes.
    before = read_records(Workspace(workspace).videos_manifest, VideoRecord)
    run_ingest(week1, workspace)
    assert read_records(Workspace(workspace).videos_manifest, VideoRecord) == before
    assert read_records(Workspace(workspace).clips_manifest, ClipRecord) == clips

    # Removing is a command that says what it removes; a dry run removes nothing.
    b_clip = next(c for c in clips if c.source_path == str(week1 / "b.mp4"))
    b_pose = next(
        p for p in read_records(Workspace(workspace).poses_manifest, PoseRecord) if p.clip_id == b_clip.clip_id
    )
    dry = remove_cli(week1, workspace, "--dry-run")
    assert (
        "would remove 3 file(s)" in dry
        and "nothing removed" in dry
        and f"kept, now under {week2 / 'copy of a.mp4'}" in dry
    )
    assert read_records(Workspace(workspace).videos_manifest, VideoRecord) == before
    out = remove_cli(week1, workspace, "--yes")
    assert "removed 3 file(s) from the manifest, 1 clip(s), 3 product file(s)" in out, out
    rows = {
        Path(r.path).relative_to(tmp_path).as_posix(): r
        for r in read_records(Workspace(workspace).videos_manifest, VideoRecord)
    }
    assert {name: r.status.value for name, r in rows.items()} == {"week2/c.mp4": "ok", "week2/copy of a.mp4": "ok"}
    assert rows["week2/copy of a.mp4"].num_clips == 1  # it inherited a.mp4's verdict and clip
    left = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    assert {c.source_path for c in left} == {str(week2 / "c.mp4"), str(week2 / "copy of a.mp4")}
    assert not (workspace / b_clip.path).exists() and not (workspace / b_pose.path).exists()
    assert all((workspace / c.path).exists() for c in left)
    assert b_clip.clip_id not in {p.clip_id for p in read_records(Workspace(workspace).poses_manifest, PoseRecord)}
    assert "no file listed" in remove_cli(week1, workspace, "--yes", code=1)


def pose_and_mask_every_clip(workspace: Path) -> None:
    """poses and masks manifests for every listed clip, by the real stages (a crafted
    constant pose model, a box segmenter): what write_shards needs, cheaply."""
    from data_schemas import write_records
    from data_schemas.config import PoseConfig, SegmentConfig
    from data_schemas.mask import MaskRecord
    from data_schemas.pose import PoseRecord
    from preprocess.pose import stage as pose_stage
    from preprocess.pose.onnx_models import build_crafted_models, detector_output_for_boxes, simcc_for_points
    from preprocess.segment import stage as segment_stage

    clips = read_records(Workspace(workspace).clips_manifest, ClipRecord)
    box = np.array([[10, 5, 60, 60]], np.float32)
    crop = np.stack([np.linspace(20, 260, 133), np.linspace(30, 350, 133)], axis=1)
    files = build_crafted_models(
        workspace / "models",
        detector_output_for_boxes(box, np.full(1, 0.9), (clips[0].height, clips[0].width)),
        simcc_for_points(crop),
    )
    cfg = PoseConfig(models="files", detector_path=files[0], pose_model_path=files[1])
    poses = [pose_stage.extract_poses(workspace / c.path, c.clip_id, cfg, files, "crafted", workspace) for c in clips]
    masks = [
        segment_stage.segment_clip(
            workspace / c.path, c.clip_id, workspace / p.path, _BoxSegmenter, "box", SegmentConfig(), workspace
        )
        for c, p in zip(clips, poses)
    ]
    write_records(poses, PoseRecord, Workspace(workspace).poses_manifest)
    write_records(masks, MaskRecord, Workspace(workspace).masks_manifest)


def shard_index(workspace: Path) -> list:
    from data_schemas.shard import ShardSample

    return read_records(Workspace(workspace).shards_index, ShardSample)


def remove_cli(target: Path, workspace: Path, *flags: str, code: int = 0) -> str:
    """``multianimate remove`` through the real command line in this process: its output."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["remove", str(target), "-w", str(workspace), *flags], env={"COLUMNS": "400"})
    assert result.exit_code == code, result.output
    # A verb's failure reaches the user as main()'s last line, from the exception.
    return " ".join(result.output.split()) + (f" {result.exception}" if result.exception else "")


def _row(path: str, sha: str, status: str = "ok", **kw) -> VideoRecord:
    return VideoRecord(
        path=path, folder=str(Path(path).parent), size_bytes=1, sha256=sha, status=VideoStatus(status), **kw
    )


def _clip(sha: str, source: str) -> ClipRecord:
    return ClipRecord(
        clip_id=f"{sha[:16]}-000",
        source_sha256=sha,
        source_path=source,
        clip_index=0,
        start_s=0.0,
        end_s=1.0,
        num_frames=25,
        fps=25.0,
        width=64,
        height=64,
        path=f"clips/{sha[:16]}-000.mp4",
        sha256="c",
        size_bytes=1,
    )


def test_content_whose_file_changed_in_place_passes_to_its_copy():
    old, new = "1" * 64, "2" * 64
    earlier = [
        _row("/w1/a.mp4", old, num_clips=1, codec="h264"),
        _row("/w2/a copy.mp4", old, "duplicate", duplicate_of="/w1/a.mp4"),
    ]
    scanned = [_row("/w1/a.mp4", new, num_clips=1)]  # week1 again: a.mp4 now holds other content
    rows, clips = merge_manifests(earlier, [_clip(old, "/w1/a.mp4")], scanned, {new: (_clip(new, "/w1/a.mp4"),)})
    by_path = {r.path: r for r in rows}
    assert by_path["/w1/a.mp4"].sha256 == new
    heir = by_path["/w2/a copy.mp4"]
    assert (heir.status, heir.codec, heir.duplicate_of, heir.folder) == (VideoStatus.ok, "h264", None, "/w2")
    assert {(c.source_sha256, c.source_path) for c in clips} == {(old, "/w2/a copy.mp4"), (new, "/w1/a.mp4")}


def test_a_version_1_videos_manifest_is_read_as_version_2(tmp_path):
    v1 = [n for n in VideoRecord.model_fields if n not in ("folder", "claimed_frames", "damaged_frames")]
    from data_schemas.io import arrow_schema

    schema = pa.schema(
        [arrow_schema(VideoRecord).field(n) for n in v1],
        metadata={b"multianimate.schema_version": b"1", b"multianimate.record": b"VideoRecord"},
    )
    row = {n: None for n in v1} | {"path": "/in/a.mp4", "status": "ok", "num_frames": 75, "num_clips": 1}
    pq.write_table(pa.Table.from_pylist([row], schema=schema), tmp_path / "videos.parquet")
    (record,) = read_videos_manifest(tmp_path / "videos.parquet")
    assert (record.path, record.claimed_frames, record.num_frames, record.folder) == ("/in/a.mp4", 75, None, None)


# ---- a long clip through pose and segmentation: memory does not grow with it -------------

LONG_FRAMES, WARM_FRAMES, SIZE = 1200, 64, (256, 192)
SLACK_MB = 64  # allocator noise and per-chunk buffers beyond the warm-up's


def test_a_long_clip_streams_through_pose_and_segmentation_with_bounded_memory(tmp_path):
    """Peak RSS of a child running the real pose stage (crafted constant-output ONNX models:
    one person in every frame) and the real segment stage (a box segmenter in SAM2's place;
    SAM2's own state is bounded by test_sam2.py) on a 64-frame clip, then on a 1200-frame
    one. The decoded long clip is 177 MB: held whole, it would show; streamed, the growth is
    what the products need (the poses; the label map and its renumbered copy) plus slack.
    Frame count alone cannot tell: what must stand out is the clip's decoded size."""
    from preprocess.pose.onnx_models import build_crafted_models, detector_output_for_boxes, simcc_for_points

    width, height = SIZE
    for name, frames in (("warm", WARM_FRAMES), ("long", LONG_FRAMES)):
        subprocess.run(
            [
                "ffmpeg",
                "-nostdin",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                f"testsrc2=size={width}x{height}:rate=25",
                "-frames:v",
                str(frames),
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-pix_fmt",
                "yuv420p",
                "-g",
                "25",
                str(tmp_path / f"{name}.mp4"),
            ],
            check=True,
        )
    crop = np.stack([np.linspace(20, 260, 133), np.linspace(30, 350, 133)], axis=1)
    box = np.array([[60, 30, 200, 180]], np.float32)
    models = build_crafted_models(
        tmp_path / "models", detector_output_for_boxes(box, np.full(1, 0.9), (height, width)), simcc_for_points(crop)
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults.test_faults_ingest", str(tmp_path), *map(str, models)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.splitlines()[-1])
    decoded_mb = LONG_FRAMES * width * height * 3 / 2**20
    label_mb = LONG_FRAMES * width * height / 2**20
    assert peaks["frames_with_persons"] == LONG_FRAMES and peaks["label_frames"] == LONG_FRAMES
    pose_growth, segment_growth = peaks["pose_long"] - peaks["pose_warm"], peaks["segment_long"] - peaks["segment_warm"]
    # Held whole, the clip would add decoded_mb to either stage's growth: beyond both bounds.
    assert decoded_mb > max(SLACK_MB, label_mb + SLACK_MB), "the clip must be big enough for the test to tell"
    assert pose_growth < SLACK_MB, (pose_growth, decoded_mb)
    assert segment_growth < 2 * label_mb + SLACK_MB, (segment_growth, label_mb, decoded_mb)


class _BoxSegmenter:
    """Each object is its starting box, every frame: the segment stage's streaming without SAM2's cost."""

    def __init__(self):
        self.boxes: dict[int, np.ndarray] = {}

    def step(self, frame: np.ndarray, new_boxes: dict[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
        self.boxes |= new_boxes
        ids = sorted(self.boxes)
        logits = np.full((len(ids), *frame.shape[:2]), -1.0, np.float32)
        for k, i in enumerate(ids):
            x1, y1, x2, y2 = np.asarray(self.boxes[i]).astype(int)
            logits[k, y1:y2, x1:x2] = 1.0
        return ids, logits


def _child(folder: Path, detector: Path, pose_model: Path) -> dict:
    from data_schemas.config import PoseConfig, SegmentConfig
    from preprocess.pose import stage as pose_stage
    from preprocess.segment import stage as segment_stage

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = PoseConfig(models="files", detector_path=detector, pose_model_path=pose_model)
    workspace, out = folder / "ws", {}
    for name in ("warm", "long"):  # the warm-up allocates every per-chunk buffer once
        record = pose_stage.extract_poses(folder / f"{name}.mp4", name, cfg, cfg.model_files(), "crafted", workspace)
        out[f"pose_{name}"], out["frames_with_persons"] = peak_mb(), record.frames_with_persons
    for name in ("warm", "long"):
        record = segment_stage.segment_clip(
            folder / f"{name}.mp4",
            name,
            Workspace(workspace).pose_file(name),
            _BoxSegmenter,
            "box",
            SegmentConfig(),
            workspace,
        )
        out[f"segment_{name}"], out["label_frames"] = peak_mb(), record.frames_with_persons
    return out


if __name__ == "__main__":
    print(json.dumps(_child(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))))
