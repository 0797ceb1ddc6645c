"""The pose stage on synthetic multi-person clips: tiny models end to end, crafted models
for 0 and 9 persons, the missing-weights message, and the Prefect flow."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from data_schemas import PoseConfig, PoseRecord, ProjectConfig, read_records
from data_schemas.mask import MaskRecord
from data_schemas.workspace import Workspace
from preprocess.pose import stage
from preprocess.pose.onnx_models import build_crafted_models, detector_output_for_boxes, simcc_for_points
from preprocess.synthetic import SyntheticSpec, make_synthetic_video, render_clip
from tests.helpers.cli import cli_env, task_states
from tests.helpers.poses import expected_provider


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """x1, y1, x2, y2 of each person's visible mask [P, H, W] (persons with no pixels dropped)."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def test_tiny_models_end_to_end_on_a_multi_person_clip(tmp_path):
    clip, _ = make_synthetic_video(SyntheticSpec(num_frames=20, num_persons=3, seed=4), tmp_path, "clip")
    cfg = PoseConfig(frames_per_chunk=8)
    files = stage.resolve_models(cfg, tmp_path / "ws")
    record = stage.extract_poses(clip, "clip", cfg, files, stage.models_digest(files), tmp_path / "ws")
    assert (record.num_frames, record.width, record.height, record.provider) == (20, 256, 192, expected_provider())
    poses = stage.load_poses(tmp_path / "ws" / record.path)
    p = record.max_persons
    assert poses["keypoints"].shape == (20, p, 133, 2) and poses["scores"].shape == (20, p, 133)
    assert poses["boxes"].shape == (20, p, 4) and poses["num_persons"].shape == (20,)
    assert (poses["width"], poses["height"]) == (256, 192) and poses["keypoints"].dtype == np.float32
    for t, n in enumerate(poses["num_persons"]):
        assert (poses["keypoints"][t, n:] == -1).all() and (poses["scores"][t, n:] == 0).all()
    assert record.frames_with_persons == int((poses["num_persons"] > 0).sum())


@pytest.mark.parametrize("num_persons", [0, 9])
def test_zero_and_nine_persons(tmp_path, num_persons):
    # A wide frame (seed 2) where the nine figures' boxes overlap less than the NMS threshold.
    spec = SyntheticSpec(width=640, height=240, num_frames=6, num_persons=num_persons, seed=2)
    clip, _ = make_synthetic_video(spec, tmp_path, "clip")
    boxes = mask_boxes(render_clip(spec).masks[0])
    assert len(boxes) == num_persons
    crop = np.stack([np.linspace(20, 260, 133), np.linspace(30, 350, 133)], axis=1)
    files = build_crafted_models(
        tmp_path / "models",
        detector_output_for_boxes(boxes, np.full(len(boxes), 0.9), (240, 640)),
        simcc_for_points(crop),
    )
    cfg = PoseConfig(models="files", detector_path=files[0], pose_model_path=files[1], max_persons=7)
    record = stage.extract_poses(clip, "clip", cfg, cfg.model_files(), "crafted", tmp_path / "ws")
    poses = stage.load_poses(tmp_path / "ws" / record.path)
    if num_persons == 0:
        assert poses["keypoints"].shape == (6, 0, 133, 2)
        assert (record.max_persons, record.frames_with_persons, record.frames_over_limit) == (0, 0, 0)
        return
    # Nine persons, seven allowed: every frame keeps the seven largest boxes and says so.
    assert (record.max_persons, record.frames_over_limit) == (7, 6)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    largest = boxes[np.sort(np.argsort(-areas)[:7])]
    kept = poses["boxes"][0]
    assert sorted(map(tuple, np.round(kept).astype(int))) == sorted(map(tuple, np.round(largest).astype(int)))


def test_missing_weights_name_the_files_and_where_to_get_them(tmp_path):
    cfg = PoseConfig(models="files", detector_path=tmp_path / "det.onnx", pose_model_path=tmp_path / "pose.onnx")
    with pytest.raises(ValueError) as info:
        stage.resolve_models(cfg, tmp_path)
    message = str(info.value)
    assert str(tmp_path / "det.onnx") in message and str(tmp_path / "pose.onnx") in message
    assert "yzd-v/DWPose" in message and "dw-ll_ucoco_384.onnx" in message
    # The same single message from the command line, before any work starts.
    profile = tmp_path / "real.yaml"
    profile.write_text(
        f"pose:\n  models: files\n  detector_path: {tmp_path / 'det.onnx'}\n  pose_model_path: {tmp_path / 'pose.onnx'}\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "preprocess",
            str(tmp_path),
            "-w",
            str(tmp_path / "ws"),
            "-c",
            str(profile),
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "DWPose weights missing" in done.stderr and "det.onnx" in done.stderr
    assert not (tmp_path / "ws").exists()


def contact_sheet_artifact(flow_run_id) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=["pose-contact-sheet"]),
            )
        )
    return artifact.data


@pytest.mark.slow
def test_preprocess_flow_writes_poses_and_masks_and_caches_them(tmp_path, prefect_api):
    from flows.preprocess import preprocess

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    for i in range(2):
        make_synthetic_video(SyntheticSpec(num_frames=30, num_persons=2, seed=i), folder, f"v{i}")
    first = preprocess(folder, workspace, ProjectConfig(), return_state=True)
    summary = first.result()
    records = read_records(Workspace(workspace).poses_manifest, PoseRecord)
    assert "data:image/jpeg;base64," in contact_sheet_artifact(first.state_details.flow_run_id)
    masks = read_records(Workspace(workspace).masks_manifest, MaskRecord)
    assert summary.num_segmented == len(masks) == 2 and all((workspace / m.path).exists() for m in masks)
    assert {m.source for m in masks} == {"sam2-tiny"} and Workspace(workspace).mask_overlays.exists()
    assert summary.num_posed == len(records) == summary.num_clips == 2 and summary.failed_clips == []
    assert all((workspace / r.path).exists() for r in records) and Workspace(workspace).pose_contact_sheet.exists()
    state = preprocess(folder, workspace, ProjectConfig(), return_state=True)
    states = task_states(state.state_details.flow_run_id, expected=4)
    assert {name: s for name, s in states.items() if name.startswith(("pose ", "segment "))} == {
        f"{stage} {r.clip_id}": "Cached" for r in records for stage in ("pose", "segment")
    }
    (workspace / records[0].path).unlink()  # a lost file is made again, not served from the cache
    preprocess(folder, workspace, ProjectConfig())
    assert (workspace / records[0].path).exists()
