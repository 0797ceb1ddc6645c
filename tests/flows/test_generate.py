"""Batch generation: job specs and the queue, pose retargeting (checked against closed forms
computed here), and the generate flow end to end on the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_schemas.config import ProjectConfig
from data_schemas.job import JobRecord, JobSpec, queue_path, record_path, submit_job
from data_schemas.model import ModelConfig
from data_schemas.workspace import Workspace
from preprocess import retarget
from preprocess.retarget import BODY_SEGMENTS, ROOT, PersonTransform
from preprocess.synthetic import SyntheticSpec, ground_truth_poses, make_synthetic_video, render_clip
from tests.helpers.poses import crafted_pose_config, driving_files

THRESHOLD = 0.3
L_SH, R_SH, L_HIP, R_HIP, L_WRIST = 5, 6, 11, 12, 9
LEFT_HAND = list(range(91, 112))


# ---- skeletons built from lengths and angles ------------------------------------------


def skeleton(rng: np.random.Generator, root: tuple[float, float], lengths: dict, shoulder_half: float) -> np.ndarray:
    """A WholeBody person [133, 2]: body segments of the given lengths at random angles,
    shoulders symmetric about the root, everything else scattered near its joint."""
    kp = np.zeros((133, 2))
    root = np.asarray(root, float)
    tilt = rng.uniform(-0.3, 0.3)
    offset = shoulder_half * np.array([np.cos(tilt), np.sin(tilt)])
    kp[L_SH], kp[R_SH] = root + offset, root - offset
    for parent, child in BODY_SEGMENTS:
        if child in (L_SH, R_SH):
            continue
        angle = rng.uniform(0, 2 * np.pi)
        start = root if parent == ROOT else kp[parent]
        kp[child] = start + lengths[(parent, child)] * np.array([np.cos(angle), np.sin(angle)])
    for joint, points in retarget.ATTACHED:
        kp[list(points)] = kp[joint] + rng.normal(0, 6, (len(points), 2))
    return kp


def random_lengths(rng: np.random.Generator, scale: float) -> dict:
    return {seg: scale * rng.uniform(10, 40) for seg in BODY_SEGMENTS}


def _seg_vector(kp: np.ndarray, parent: int, child: int) -> np.ndarray:
    start = (kp[..., L_SH, :] + kp[..., R_SH, :]) / 2 if parent == ROOT else kp[..., parent, :]
    return kp[..., child, :] - start


def _torso(kp: np.ndarray) -> np.ndarray:
    return np.linalg.norm(
        (kp[..., L_HIP, :] + kp[..., R_HIP, :]) / 2 - (kp[..., L_SH, :] + kp[..., R_SH, :]) / 2, axis=-1
    )


@pytest.fixture
def people():
    """A reference person and a driving person of other proportions, moving over 7 frames."""
    rng = np.random.default_rng(0)
    ref = skeleton(rng, (200, 150), random_lengths(rng, 1.0), 25.0)
    base = random_lengths(rng, 0.6)
    # every frame its own pose and slightly different limb lengths (detector jitter): the
    # ratios use the median length, so this checks that too
    drv = np.stack(
        [
            skeleton(rng, (60 + 5 * t, 80 - 2 * t), {s: v * rng.uniform(0.9, 1.1) for s, v in base.items()}, 14.0)
            for t in range(7)
        ]
    )
    return ref, drv


def test_every_segment_takes_the_reference_length_and_keeps_the_driving_direction(people):
    ref, drv = people
    out, transform = retarget.retarget_person(drv, np.full(drv.shape[:2], 0.9), ref, np.full(133, 0.9), THRESHOLD)
    # independent closed forms: global scale from the torsos, root motion scaled by it
    s = _torso(ref) / np.median(_torso(drv))
    drv_root = (drv[:, L_SH] + drv[:, R_SH]) / 2
    want_root = (ref[L_SH] + ref[R_SH]) / 2 + s * (drv_root - drv_root[0])
    np.testing.assert_allclose((out[:, L_SH] + out[:, R_SH]) / 2, want_root, atol=1e-9)
    assert transform.scale == pytest.approx(s)
    for parent, child in BODY_SEGMENTS:
        got, d = _seg_vector(out, parent, child), _seg_vector(drv, parent, child)
        if child in (L_SH, R_SH):  # one ratio for both shoulders: the shoulder width
            ratio = np.linalg.norm(ref[L_SH] - ref[R_SH]) / np.median(
                np.linalg.norm(drv[:, L_SH] - drv[:, R_SH], axis=-1)
            )
        else:
            ratio = np.linalg.norm(_seg_vector(ref, parent, child)) / np.median(np.linalg.norm(d, axis=-1))
        np.testing.assert_allclose(got, ratio * d, atol=1e-9, err_msg=f"segment {parent}->{child}")
    # hands keep their driving shape, scaled by s, on the new wrist
    np.testing.assert_allclose(
        out[:, LEFT_HAND] - out[:, [L_WRIST]], s * (drv[:, LEFT_HAND] - drv[:, [L_WRIST]]), atol=1e-9
    )


def test_a_scaled_and_shifted_copy_lands_on_the_reference(people):
    ref, _ = people
    a, b = 0.5, np.array([30.0, -12.0])
    moves = np.array([[0, 0], [3, 1], [8, -2], [15, 4]], float)
    drv = np.stack([a * ref + b + m for m in moves])
    out, _ = retarget.retarget_person(drv, np.full(drv.shape[:2], 0.9), ref, np.full(133, 0.9), THRESHOLD)
    np.testing.assert_allclose(out, np.stack([ref + m / a for m in moves]), atol=1e-9)


def test_missing_points_stay_missing_and_orphans_follow_the_whole_person(people):
    ref, drv = people
    scores = np.full(drv.shape[:2], 0.9)
    scores[2, 7] = 0.1  # the left elbow is not seen in frame 2
    out, transform = retarget.retarget_person(drv, scores, ref, np.full(133, 0.9), THRESHOLD)
    assert (out[2, 7] == -1).all()
    np.testing.assert_allclose(out[2, L_WRIST], transform.apply(drv[2, L_WRIST]), atol=1e-9)  # its parent is gone
    np.testing.assert_allclose(
        out[2, LEFT_HAND] - out[2, L_WRIST], transform.scale * (drv[2, LEFT_HAND] - drv[2, L_WRIST]), atol=1e-9
    )


def test_persons_are_matched_left_to_right_unless_mapped():
    assert retarget.match_persons([50.0, 10.0, np.nan], [300.0, 20.0], None) == {2: 1, 1: 0}
    assert retarget.match_persons([50.0, 10.0], [300.0, 20.0], {1: 1, 2: 2}) == {1: 1, 2: 0}
    with pytest.raises(ValueError, match="2 person.* in the driving frames.*1 in the reference image.*person_map"):
        retarget.match_persons([50.0, 10.0], [20.0], None)
    with pytest.raises(ValueError, match="driving person 3 has no pose"):
        retarget.match_persons([50.0, 10.0, np.nan], [20.0, 30.0], {3: 1})
    with pytest.raises(ValueError, match="reference person 3"):
        retarget.match_persons([50.0, 10.0], [20.0, 30.0], {1: 3})
    with pytest.raises(ValueError, match="no person with a pose"):
        retarget.match_persons([np.nan], [], None)


def test_masks_move_with_their_person():
    labels = np.zeros((2, 20, 30), np.uint8)
    labels[:, 4:12, 5:10] = 1
    labels[:, 0:3, 0:3] = 2  # another person: not moved with person 1
    transform = PersonTransform(scale=2.0, anchor_driving=(5.0, 4.0), anchor_reference=(20.0, 10.0))
    # reference 60x40 -> output 30x20 halves it again: x -> x + 5, y -> y + 1
    moved = retarget.warp_person_masks(labels, 1, transform, (60, 40), (30, 20))
    want = np.zeros((2, 20, 30), bool)
    want[:, 5:13, 10:15] = True
    np.testing.assert_array_equal(moved, want)


def test_job_inputs_from_ground_truth_poses_and_masks(tmp_path):
    poses, masks = driving_files(tmp_path, SyntheticSpec(width=128, height=96, num_frames=9, num_persons=2, seed=1))
    ref_clip = render_clip(SyntheticSpec(width=160, height=128, num_frames=1, num_persons=2, seed=2))
    ref_arrays, _ref_origin = ground_truth_poses(ref_clip, seed=0)
    ref_kp, ref_scores = ref_arrays["keypoints"][0], ref_arrays["scores"][0]
    driving = retarget.load_driving(poses, masks, 5)
    assert driving.keypoints.shape == (5, 2, 133, 2) and driving.label_map.shape == (5, 96, 128)
    inputs = retarget.prepare_inputs(driving, ref_kp, ref_scores, (160, 128), (64, 48), None, "unianimate", THRESHOLD)
    assert inputs.pose.shape == (5, 48, 64, 3) and inputs.pose.dtype == np.uint8 and inputs.pose.any()
    assert inputs.ref_pose.shape == (48, 64, 3) and inputs.ref_pose.any()
    assert inputs.masks.shape == (2, 5, 48, 64) and inputs.masks.any(axis=(1, 2, 3)).all()
    # the leftmost driving person (in its first frame) animates the leftmost reference person
    ok = ref_scores > THRESHOLD
    ref_x = [ref_kp[r, ok[r], 0].mean() for r in range(2)]
    drv_x = [driving.keypoints[0, k, driving.scores[0, k] > THRESHOLD, 0].mean() for k in range(2)]
    assert inputs.person_map[int(np.argmin(drv_x)) + 1] == 1 and sorted(inputs.person_map.values()) == [1, 2]
    # ... and stands where that reference person stands, neck on neck, in its first frame with a neck
    for i, (label, number) in enumerate(inputs.person_map.items()):
        row = int(np.argsort(ref_x)[number - 1])
        first = int(np.argmax((driving.scores[:, label - 1, [L_SH, R_SH]] > THRESHOLD).all(axis=1)))
        np.testing.assert_allclose(
            inputs.keypoints[first, i, [L_SH, R_SH]].mean(axis=0), ref_kp[row, [L_SH, R_SH]].mean(axis=0), atol=1e-4
        )
    with pytest.raises(ValueError, match=f"{poses}: 9 frames, the job needs 13"):
        retarget.load_driving(poses, masks, 13)


def test_reference_image_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope.png'}: reference image not found"):
        retarget.read_reference_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: not a readable image"):
        retarget.read_reference_image(tmp_path / "text.png")


# ---- job specs and the queue ----------------------------------------------------------


def test_job_id_is_a_hash_of_the_spec_and_specs_are_checked(tmp_path):
    a = JobSpec(reference=tmp_path / "r.png", driving_video=tmp_path / "d.mp4", seed=1)
    assert a.job_id == JobSpec.model_validate_json(a.model_dump_json()).job_id == JobSpec(**a.model_dump()).job_id
    assert a.job_id != a.model_copy(update={"seed": 2}).job_id and len(a.job_id) == 16
    for bad, message in (
        (dict(num_frames=10), "4k\\+1"),
        (dict(width=100), "divisible by 16"),
        (dict(poses=tmp_path / "p.npz", masks=tmp_path / "m.npz"), "not both"),
        (dict(driving_video=None), "give a driving_video"),
        (dict(reference=Path("r.png")), "absolute path"),
        (dict(person_map={1: 1, 2: 1}), "share one reference person"),
    ):
        with pytest.raises(ValueError, match=message):
            JobSpec(**(dict(reference=tmp_path / "r.png", driving_video=tmp_path / "d.mp4") | bad))


def test_submitting_twice_queues_one_job(tmp_path):
    from typer.testing import CliRunner

    from bench.fault_cases.generate import driving_video
    from flows.cli import app

    cv2.imwrite(str(tmp_path / "ref.png"), np.full((64, 64, 3), 128, np.uint8))
    driving_video(tmp_path / "d.mp4", seconds=6.0)  # 90 frames at the default 15 fps: enough for 81
    args = [
        "submit",
        str(tmp_path / "ref.png"),
        "--video",
        str(tmp_path / "d.mp4"),
        "--steps",
        "2",
        "--person-map",
        "1=2,2=1",
        "-w",
        str(tmp_path / "ws"),
    ]
    first, second = CliRunner().invoke(app, args), CliRunner().invoke(app, args)
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    job_id = first.stdout.strip().splitlines()[-1]
    assert second.stdout.strip().splitlines()[-1] == job_id
    assert [p.name for p in Workspace(tmp_path / "ws").queue.iterdir()] == [f"{job_id}.json"]
    spec = JobSpec.model_validate_json(queue_path(tmp_path / "ws", job_id).read_bytes())
    assert spec.job_id == job_id and spec.steps == 2 and spec.person_map == {1: 2, 2: 1}
    bad = CliRunner().invoke(
        app,
        [
            "submit",
            str(tmp_path / "ref.png"),
            "--video",
            str(tmp_path / "d.mp4"),
            "--num-frames",
            "10",
            "-w",
            str(tmp_path / "ws"),
        ],
    )
    assert bad.exit_code != 0 and "4k+1" in bad.output


# ---- memory options of a job -----------------------------------------------------------


@pytest.fixture(scope="module")
def real_sized_components():
    """The real profile's networks on the meta device (no memory, no weights): the bf16 base,
    a float32 rank-128 LoRA, float32 encoders, VAE and CLIP ViT-H/14."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from data_schemas.model import WAN_14B_DIT
    from model.components import Components
    from model.dit import MultiAnimateDiT, build_transformer

    with torch.device("meta"):
        dit = MultiAnimateDiT(build_transformer(WAN_14B_DIT), 8)
        dit.add_lora(128, 128.0)
        for name, p in dit.transformer.named_parameters():
            p.data = p.data.to(torch.float32 if ".lora_" in name else torch.bfloat16)
        vae = AutoencoderKLWan()
        clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
        )
    return Components(dit, vae, clip, None, ModelConfig())


def test_offload_is_the_least_that_fits_the_gpu():
    from model.components import build_components
    from model.pipeline import ACTIVATION_HEADROOM_BYTES, choose_offload, module_bytes, networks

    comps = build_components(ModelConfig())
    sizes = {name: module_bytes(m) for name, m in networks(comps).items()}
    everything = sum(sizes.values()) + ACTIVATION_HEADROOM_BYTES
    dit_and_vae = sizes["transformer"] + sizes["vae"] + ACTIVATION_HEADROOM_BYTES
    assert choose_offload(comps, everything)[0] == "none"
    assert choose_offload(comps, everything - 1)[0] == choose_offload(comps, dit_and_vae)[0] == "model"
    mode, why = choose_offload(comps, dit_and_vae - 1)
    assert mode == "group" and "offload=group" in why


@pytest.mark.slow
@pytest.mark.parametrize(
    "gpu_mib, mode",
    [(24564, "group"), (40536, "group"), (46068, "model"), (49140, "none"), (81559, "none")],
    ids=["24GB", "A100-40GB", "L40S-48GB", "A6000-48GB", "H100-80GB"],
)
def test_the_real_model_offloads_as_docs_memory_says(real_sized_components, gpu_mib, mode):
    """docs/memory.md's table, from the parameter bytes of the real networks."""
    from model.pipeline import choose_offload, module_bytes, networks

    comps = real_sized_components
    sizes = {name: module_bytes(m) for name, m in networks(comps).items()}
    assert round(sizes["transformer"] / 1e9, 1) == 35.2  # 32.8 GB bf16 base + 2.45 GB float32 LoRA
    assert round(sizes["image_encoder"] / 1e9, 1) == 2.5 and round(sizes["vae"] / 1e9, 1) == 0.5
    assert choose_offload(comps, gpu_mib * 2**20)[0] == mode


def test_a_job_samples_with_its_spec_and_the_memory_options(tmp_path):
    from model.generate import job_sampling
    from model.pipeline import SamplingConfig

    spec = JobSpec(reference=tmp_path / "r.png", driving_video=tmp_path / "d.mp4", steps=3, seed=7, guidance_scale=2.0)
    memory = SamplingConfig(vae_tiling=False, merge_lora=False, step_cache="first-block", steps=9, seed=1)
    sampling = job_sampling(spec, memory, "group")
    assert (sampling.steps, sampling.seed, sampling.guidance_scale, sampling.offload) == (3, 7, 2.0, "group")
    assert (sampling.vae_tiling, sampling.merge_lora, sampling.step_cache) == (False, False, "first-block")
    assert not sampling.progress
    # None: the pipeline's default, on for the real profile
    assert job_sampling(spec, SamplingConfig(), "none").vae_tiling is None


def test_the_job_pipeline_is_built_once_with_its_lora_merged(monkeypatch):
    import model.generate as generate_module
    from model.pipeline import SamplingConfig, lora_layers

    monkeypatch.setattr(generate_module, "_loaded", {})
    first = generate_module.load_pipeline(ModelConfig(), SamplingConfig())
    assert generate_module.load_pipeline(ModelConfig(), SamplingConfig(steps=3)) is first  # steps do not matter
    gpu = torch.cuda.is_available()
    assert first.offload == "none" and first.note is None
    assert first.pipe.device == (torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu"))
    assert all(layer.merged for layer in lora_layers(first.pipe.c.dit.transformer))
    unmerged = generate_module.load_pipeline(ModelConfig(), SamplingConfig(merge_lora=False))
    assert unmerged is not first and not any(layer.merged for layer in lora_layers(unmerged.pipe.c.dit.transformer))


# ---- the flow -------------------------------------------------------------------------


def artifact(flow_run_id, key: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    return found.data


@pytest.mark.slow
def test_generate_runs_the_queue_records_failures_and_never_redoes_a_finished_job(tmp_path, prefect_api):
    import decord

    from flows.generate import generate

    workspace, inputs = tmp_path / "ws", tmp_path / "in"
    video, _ = make_synthetic_video(
        SyntheticSpec(width=64, height=64, num_frames=12, num_persons=2, seed=1), inputs, "driving"
    )
    ref_clip = render_clip(SyntheticSpec(width=64, height=64, num_frames=1, num_persons=2, seed=5))
    reference = inputs / "reference.png"
    cv2.imwrite(str(reference), ref_clip.frames[0][..., ::-1])
    # The tiny SAM2 may start extra persons (its masks are random): name who animates whom.
    common = dict(driving_video=video, steps=2, num_frames=9, height=64, width=64, fps=25.0, person_map={1: 1, 2: 2})
    bad = JobSpec(reference=inputs / "missing.png", **common)
    good = JobSpec(reference=reference, **common)
    # poses and masks given (ground truth: exactly two persons), matched left to right
    poses, masks = driving_files(inputs, SyntheticSpec(width=64, height=64, num_frames=9, num_persons=2, seed=2))
    given = JobSpec(
        reference=reference,
        poses=poses,
        masks=masks,
        steps=2,
        num_frames=5,
        height=64,
        width=32,
        prompt="a man and a woman are dancing",
    )
    for spec in (bad, good, given):
        submit_job(workspace, spec)
    config = ProjectConfig(pose=crafted_pose_config(tmp_path / "models", (64, 64)))

    assert generate(tmp_path / "empty", config).num_queued == 0  # nothing queued: nothing to do, no error
    state = generate(workspace, config, return_state=True)
    summary = state.result()
    assert (summary.num_queued, sorted(summary.ok), summary.failed, summary.skipped) == (
        3,
        sorted([good.job_id, given.job_id]),
        [bad.job_id],
        [],
    )
    failed = JobRecord.model_validate_json(record_path(workspace, bad.job_id).read_bytes())
    assert failed.status == "failed" and failed.reason == "invalid_input"
    assert failed.error == f"reference: {inputs / 'missing.png'}: reference image not found"
    folder = Workspace(workspace).output(good.job_id)
    assert sorted(p.name for p in folder.iterdir()) == ["job.json", "preview.mp4", "preview.png", "video.mp4"]
    record = JobRecord.model_validate_json((folder / "job.json").read_bytes())
    assert (
        record.status == "ok" and record.spec == good and record.person_map == {1: 1, 2: 2} and record.num_persons == 2
    )
    assert record.outputs["video"] == f"outputs/{good.job_id}/video.mp4" and record.prompt == "two person are dancing"
    reader = decord.VideoReader(str(folder / "video.mp4"))
    assert (len(reader), *reader[0].shape) == (9, 64, 64, 3)
    assert cv2.imread(str(folder / "preview.png")).shape == (64, 3 * 64, 3)
    from_npz = JobRecord.model_validate_json(record_path(workspace, given.job_id).read_bytes())
    assert sorted(from_npz.person_map.values()) == [1, 2] and from_npz.prompt == given.prompt
    assert len(decord.VideoReader(str(workspace / from_npz.outputs["video"]))) == 5
    table = json.loads(artifact(state.state_details.flow_run_id, "generate-jobs"))
    assert {(row["job"], row["status"]) for row in table} == {
        (good.job_id, "ok"),
        (given.job_id, "ok"),
        (bad.job_id, "failed"),
    }
    assert "data:image/jpeg;base64," in artifact(state.state_details.flow_run_id, "generate-previews")

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = generate(workspace, config)
    assert (
        sorted(again.skipped) == sorted([good.job_id, given.job_id]) and again.ok == [] and again.failed == [bad.job_id]
    )  # failures are retried
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
