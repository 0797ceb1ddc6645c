"""Truth models (preprocess/truth.py): the clip's frames of the generator's truth, found by
ffmpeg's own resampling rule, and the pose and segment stages run on them."""

from __future__ import annotations

import subprocess

import decord
import numpy as np
import pytest

from data_schemas.workspace import Workspace
from preprocess.media import read_frames, write_video
from preprocess.synthetic import OPENPOSE_TO_WHOLEBODY, SyntheticSpec, make_synthetic_video, render_clip
from preprocess.truth import MissingTruthError, TruthPoses, clip_truth, source_frames


@pytest.mark.parametrize("fps_in", [30.0, 25.0, 12.0])
def test_source_frames_follow_ffmpeg_fps_filter(tmp_path, fps_in):
    """Resampled by ffmpeg's fps filter as ingest does, every output frame is the rendered
    frame source_frames names (matched by pixels, independently of the rule)."""
    clip = render_clip(
        SyntheticSpec(width=64, height=48, num_frames=36, num_persons=1, fps=fps_in, motions=("walk",), seed=3)
    )
    source = write_video(clip.frames, tmp_path / "src.mp4", fps=fps_in)
    out = tmp_path / "out.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-i",
            str(source),
            "-vf",
            "setpts=PTS-STARTPTS,fps=25",
            "-c:v",
            "libx264",
            "-qp",
            "0",
            "-pix_fmt",
            "yuv444p",
            str(out),
        ],
        check=True,
    )
    frames = read_frames(out, list(range(len(decord.VideoReader(str(out))))))
    distance = ((frames[:, None].astype(np.float32) - clip.frames[None].astype(np.float32)) ** 2).mean(axis=(2, 3, 4))
    nearest = distance.argmin(axis=1)
    # only frames the motion tells apart (a still figure leaves two renders alike); the
    # codec's noise is the floor of every distance
    distinct = np.sort(distance, axis=1)[:, 1] > 1.5 * distance.min(axis=1)
    expected = source_frames(0, len(frames), 25.0, fps_in, len(clip.frames))
    assert distinct.sum() > len(frames) // 2
    np.testing.assert_array_equal(nearest[distinct], expected[distinct])
    # an offset into the resampled video (a later clip of the same source) is the same rule
    np.testing.assert_array_equal(source_frames(5, 7, 25.0, fps_in, len(clip.frames)), expected[5:12])


def test_clip_truth_maps_and_scales(tmp_path):
    spec = SyntheticSpec(width=128, height=96, num_frames=20, num_persons=2, seed=5)
    video, _ = make_synthetic_video(spec, tmp_path, "v")
    full = render_clip(spec)
    truth = clip_truth("c", video, start_s=0.2, fps=25.0, num_frames=10, width=64, height=48)
    np.testing.assert_allclose(truth.keypoints, full.keypoints[5:15] / 2)
    assert truth.masks.shape == (10, 2, 48, 64)
    np.testing.assert_array_equal(truth.masks, full.masks[5:15, :, ::2, ::2])
    with pytest.raises(MissingTruthError, match="clip other: its source .*none.mp4 has no ground truth"):
        clip_truth("other", tmp_path / "none.mp4", 0.0, 25.0, 10, 64, 48)


def test_truth_poses_answer_like_a_detector(tmp_path):
    spec = SyntheticSpec(width=96, height=96, num_frames=8, num_persons=3, seed=1)
    clip = render_clip(spec)
    poses, truncated = TruthPoses(clip).estimate(np.zeros((8, 96, 96, 3), np.uint8), max_persons=2)
    for t, frame in enumerate(poses):
        present = [p for p in range(3) if clip.masks[t, p].any()]
        assert len(frame.boxes) == min(2, len(present))
        for row in range(len(frame.boxes)):
            # each row is one figure: its body points, hands and face absent
            matches = [
                p
                for p in present
                if np.allclose(
                    frame.keypoints[row, list(OPENPOSE_TO_WHOLEBODY.values())],
                    clip.keypoints[t, p, list(OPENPOSE_TO_WHOLEBODY)],
                )
            ]
            assert len(matches) == 1
            assert (frame.keypoints[row, 23:] == -1).all() and (frame.scores[row, 23:] == 0).all()
    assert truncated == sum(int(sum(clip.masks[t, p].any() for p in range(3)) > 2) for t in range(8))


def _openpose_of_truth(keypoints: np.ndarray, visible: np.ndarray, width: int, height: int):
    """An OpenPose frame built straight from the generator's 18 points (not through the
    stage's WholeBody conversion): visible points normalised, hidden ones -1; the neck by
    the DWPose rule (spec A.5), the shoulders' mean, present when both are."""
    from preprocess.pose.convert import OpenPoseFrame

    p = len(keypoints)
    keypoints, visible = keypoints.astype(np.float64).copy(), visible.copy()
    keypoints[:, 1] = (keypoints[:, 2] + keypoints[:, 5]) / 2
    visible[:, 1] = visible[:, 2] & visible[:, 5]
    body = np.where(visible[..., None], keypoints / np.array([width, height]), -1.0)
    absent = lambda n: (np.full((p, n, 2), -1.0), np.zeros((p, n)))
    (feet, feet_s), (lh, lh_s), (rh, rh_s), (face, face_s) = absent(2), absent(21), absent(21), absent(68)
    return OpenPoseFrame(
        body=body,
        body_scores=visible * 0.9,
        feet=feet,
        feet_scores=feet_s,
        left_hands=lh,
        left_hand_scores=lh_s,
        right_hands=rh,
        right_hand_scores=rh_s,
        faces=face,
        face_scores=face_s,
        threshold=0.3,
    )


@pytest.mark.slow
def test_preprocess_with_truth_models(tmp_path, prefect_api):
    """The pose and segment stages with the truth models: poses frame-exact, pose images as a
    rendering of the generator's points, one number per person through a crossing, every
    record saying 'truth'; a clip without truth fails alone, naming itself."""
    from data_schemas import ProjectConfig, read_records
    from data_schemas.mask import MaskRecord
    from data_schemas.pose import PoseRecord
    from data_schemas.video import ClipRecord
    from flows.preprocess import preprocess
    from preprocess.pose.convert import wholebody_to_openpose
    from preprocess.pose.render import draw_pose
    from preprocess.synthetic import load_ground_truth

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    specs = {
        "cross": SyntheticSpec(width=160, height=96, num_frames=40, num_persons=2, motions=("walk", "walk"), seed=11),
        "three": SyntheticSpec(width=128, height=96, num_frames=30, num_persons=3, seed=12),
    }
    for name, spec in specs.items():
        make_synthetic_video(spec, folder, name)
    make_synthetic_video(SyntheticSpec(width=128, height=96, num_frames=30, seed=13), folder, "lost")
    (folder / "lost.gt.npz").unlink()
    config = ProjectConfig.model_validate({"pose": {"models": "truth"}, "segment": {"models": "truth"}})
    summary = preprocess(folder, workspace, config)

    clips = {c.clip_id: c for c in read_records(Workspace(workspace).clips_manifest, ClipRecord)}
    by_name = {c.source_path.rsplit("/", 1)[-1].removesuffix(".mp4"): c for c in clips.values()}
    assert summary.failed_clips == [by_name["lost"].clip_id]
    poses = {r.clip_id: r for r in read_records(Workspace(workspace).poses_manifest, PoseRecord)}
    masks = {r.clip_id: r for r in read_records(Workspace(workspace).masks_manifest, MaskRecord)}
    assert {(r.models, r.provider) for r in poses.values()} == {("truth", "truth")} and {
        m.source for m in masks.values()
    } == {"truth"}
    for name, spec in specs.items():
        clip = by_name[name]
        truth = load_ground_truth(folder / f"{name}.gt.npz")
        frames = slice(
            round(clip.start_s * spec.fps), round(clip.start_s * spec.fps) + clip.num_frames
        )  # 25 fps in and out
        kp, visible, labels = truth.keypoints[frames], truth.keypoint_visible[frames], truth.label_map()[frames]
        present = [p for p in range(spec.num_persons) if truth.masks[frames, p].any()]
        assert masks[clip.clip_id].num_persons == len(present) == spec.num_persons
        stored = np.load(workspace / poses[clip.clip_id].path)
        body = list(OPENPOSE_TO_WHOLEBODY.values())
        for t in range(clip.num_frames):
            rows = stored["keypoints"][t, : stored["num_persons"][t]][:, body]
            want = [
                kp[t, p, list(OPENPOSE_TO_WHOLEBODY)]
                for p in range(spec.num_persons)
                if truth.masks[frames][t, p].any()
            ]
            assert sorted(a.tobytes() for a in rows) == sorted(a.tobytes() for a in want), (name, t)
            # each person's pose image: the stage's conversion and rendering against the generator's points
            for row in range(len(rows)):
                (p,) = [
                    q
                    for q in range(spec.num_persons)
                    if np.array_equal(rows[row], kp[t, q, list(OPENPOSE_TO_WHOLEBODY)])
                ]
                ours = draw_pose(
                    wholebody_to_openpose(
                        stored["keypoints"][t, row : row + 1],
                        stored["scores"][t, row : row + 1],
                        spec.width,
                        spec.height,
                    ),
                    spec.height,
                    spec.width,
                )
                theirs = draw_pose(
                    _openpose_of_truth(kp[t, p : p + 1], visible[t, p : p + 1], spec.width, spec.height),
                    spec.height,
                    spec.width,
                )
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} frame {t} person {p}")
        # identities: one number per person for the whole clip, through the crossing
        if name == "cross":
            assert len(set(np.sign(kp[:, 0, 1, 0] - kp[:, 1, 1, 0]))) == 2  # they do pass each other
        label_map = np.load(workspace / masks[clip.clip_id].path)["label_map"]
        numbering = {int(a): int(b) for a, b in zip(labels.ravel(), label_map.ravel())}
        assert len(numbering) == spec.num_persons + 1 and len(set(numbering.values())) == spec.num_persons + 1
        np.testing.assert_array_equal(np.vectorize(numbering.get)(labels), label_map)
