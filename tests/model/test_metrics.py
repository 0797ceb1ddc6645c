"""The evaluation protocol's measures (model/metrics.py, model/feature_nets.py) against independent
computations and on synthetic clips whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data_schemas.evaluation import PROTOCOL_VERSION, ClipScores, EvalNetworks, EvalSummary, Protocol
from data_schemas.io import read_records, write_records
from model import metrics
from model.feature_nets import (
    ALEX_CHANNELS,
    LPIPS,
    ImageEncoderAppearance,
    InceptionI3d,
    load_eval_networks,
    tiny_lpips,
)
from model.pipeline import latent_windows
from preprocess.synthetic import SyntheticSpec, ground_truth_poses, render_clip

# small frames: the protocol's short side is set to the clips' own, so nothing is resized
PROTOCOL = Protocol(short_side=96)


@pytest.fixture(scope="module")
def clip():
    return render_clip(SyntheticSpec(width=128, height=96, num_frames=48, num_persons=3, seed=1))


@pytest.fixture(scope="module")
def nets():
    return load_eval_networks(EvalNetworks(), PROTOCOL)


def _poses(clip, seed: int) -> metrics.Poses:
    arrays, origin = ground_truth_poses(clip, seed=seed)
    index = np.full((clip.spec.num_frames, clip.spec.num_persons), -1, np.int64)
    for t, rows in enumerate(origin):
        for row, person in enumerate(rows):
            index[t, person] = row
    return metrics.Poses(arrays["keypoints"], arrays["scores"], index)


@pytest.fixture(scope="module")
def truth_result(clip, nets):
    # the truth scored as if generated; the re-detection lists persons in another order
    return metrics.score_clip(
        "c",
        clip.frames,
        25.0,
        clip.frames.copy(),
        25.0,
        clip.label_map(),
        nets,
        PROTOCOL,
        truth_poses=_poses(clip, 0),
        generated_poses=_poses(clip, 7),
    )


# ----------------------------------------------------------------------- PSNR, SSIM, LPIPS
def test_psnr_matches_skimage_and_hand_computed_cases():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ours = metrics.psnr_frames(b, a)
    theirs = [peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(3)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert metrics.psnr(b, a) == pytest.approx(np.mean(theirs))
    # every value off by one: MSE 1, PSNR = 20 log10(255)
    assert metrics.psnr(np.minimum(a, 254) + 1, np.minimum(a, 254)) == pytest.approx(20 * math.log10(255))
    assert metrics.psnr(a, a) == Protocol().psnr_max_db


def test_ssim_matches_skimage_gaussian_window(clip):
    rng = np.random.default_rng(1)
    truth = clip.frames[:3]
    noisy = np.clip(truth.astype(int) + rng.integers(-30, 31, truth.shape), 0, 255).astype(np.uint8)
    ours = metrics.ssim_maps(noisy, truth).reshape(3, -1).mean(1)
    theirs = [
        structural_similarity(
            truth[i],
            noisy[i],
            data_range=255,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    assert metrics.ssim(truth, truth) == pytest.approx(1.0, abs=1e-12)


def _lpips_by_hand(features: torch.nn.Sequential, heads: list[torch.Tensor], x0: torch.Tensor, x1: torch.Tensor):
    """LPIPS as Zhang et al. 2018 define it, on torchvision's AlexNet modules (not our class)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h0, h1 = (x0 - shift) / scale, (x1 - shift) / scale
    total = torch.zeros(len(x0))
    taps = iter(heads)
    for i, layer in enumerate(features):
        h0, h1 = layer(h0), layer(h1)
        if isinstance(layer, torch.nn.ReLU):  # LPIPS taps every ReLU of AlexNet
            n0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = h1 / (h1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = next(taps).view(1, -1, 1, 1)
            total += ((n0 - n1) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_real_layout_files_match_an_independent_computation(tmp_path):
    import torchvision

    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None).features.eval()
    for m in alex:
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    heads = [torch.rand(c) for c in ALEX_CHANNELS]
    # the files as torchvision and the lpips package lay them out
    torch.save({f"features.{k}": v for k, v in alex.state_dict().items()}, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": h.view(1, -1, 1, 1) for i, h in enumerate(heads)}, tmp_path / "alex.pth")
    cfg = EvalNetworks(lpips_backbone_path=str(tmp_path / "alexnet.pth"), lpips_heads_path=str(tmp_path / "alex.pth"))
    # built through the same loader as the real files
    nets = load_eval_networks(cfg, Protocol())
    loaded = nets.lpips
    assert isinstance(loaded, LPIPS) and nets.lpips_name.startswith("alex sha256:")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    x0, x1 = (torch.from_numpy(v).permute(0, 3, 1, 2).float() / 127.5 - 1 for v in (b, a))
    with torch.no_grad():
        expected = _lpips_by_hand(alex, heads, x0, x1).numpy()
        ours = metrics.lpips_frames(b, a, loaded)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    assert metrics.lpips(a, a, loaded) == 0.0


def test_lpips_tiny_is_a_distance():
    net = tiny_lpips(seed=0)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    assert metrics.lpips(a, a, net) == 0.0
    np.testing.assert_allclose(metrics.lpips_frames(a, b, net), metrics.lpips_frames(b, a, net), rtol=1e-5)
    assert (metrics.lpips_frames(a, b, net) > 0).all()


# -------------------------------------------------------------------------------- Frechet
def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("n_a, n_b, dim", [(300, 250, 12), (40, 60, 8)])
def test_frechet_distance_matches_scipy_sqrtm(n_a, n_b, dim):
    rng = np.random.default_rng(n_a)
    a = rng.normal(size=(n_a, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(0.3, 1.5, size=(n_b, dim))
    assert metrics.frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-8)


def test_frechet_distance_with_fewer_samples_than_features():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 20)), rng.normal(1.0, 2.0, size=(9, 20))
    # the symmetric form sqrt(S_a) S_b sqrt(S_a) is where scipy's sqrtm is reliable for singular S
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa).real
    expected = (
        ((a.mean(0) - b.mean(0)) ** 2).sum()
        + np.trace(sa)
        + np.trace(sb)
        - 2 * np.trace(linalg.sqrtm(root @ sb @ root)).real
    )
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_hand_computed_cases():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(50, 16))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(a[:5], a[:5]) == pytest.approx(0.0, abs=1e-9)
    shift = np.arange(16) / 10
    # same covariance, means apart: the squared distance of the means
    assert metrics.frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(a[:1], a)


# ------------------------------------------------------------------ the truth as generated
def test_truth_scored_as_generated_is_perfect(truth_result):
    s = truth_result.scores
    assert s.psnr >= 40 and s.ssim == pytest.approx(1.0) and s.lpips == 0.0
    assert s.num_persons == 3 and s.num_frames == 48 and s.num_video_segments == 3
    assert s.swap_rate == 0.0 and all(r == 0.0 for r in s.person_swap_rate) and s.swap_persons_a == ()
    assert s.swap_feature == "colour-histogram-8"
    assert s.pck == 1.0 and all(p == 1.0 for p in s.person_pck) and min(s.person_pck_keypoints) > 0
    assert all(p >= 40 for p in s.person_psnr) and all(v == pytest.approx(1.0) for v in s.person_ssim)
    assert s.background_change == s.background_change_truth > 0  # the texture drifts
    assert s.seam_joins == () and s.seam_drift is None  # 48 frames: one window
    assert s.protocol_version == PROTOCOL_VERSION and s.protocol_digest == PROTOCOL.digest()
    assert s.tiny_networks and "tiny random" in s.networks and s.resampling == ""
    summary = metrics.summarize([truth_result])
    assert summary.fvd == pytest.approx(0.0, abs=1e-6) and summary.fid_vid == pytest.approx(0.0, abs=1e-6)
    assert summary.num_video_segments == 3 and summary.tiny_networks


def test_frozen_frames_score_worse(clip, nets, truth_result):
    frozen = clip.frames[(np.arange(48) // 8) * 8]  # every 8th frame held for 8 frames
    result = metrics.score_clip("c", clip.frames, 25.0, frozen, 25.0, clip.label_map(), nets, PROTOCOL)
    truth_summary, frozen_summary = metrics.summarize([truth_result]), metrics.summarize([result])
    assert result.scores.psnr < truth_result.scores.psnr - 30
    assert result.scores.ssim < truth_result.scores.ssim
    assert frozen_summary.fvd > truth_summary.fvd + 1e-3
    assert frozen_summary.fid_vid > truth_summary.fid_vid + 1e-3
    assert result.scores.pck is None  # no poses given: nothing judged


def _exchange_persons(clip, a: int, b: int, start: int) -> np.ndarray:
    """The truth with persons a and b (1-based) wearing each other's colours from frame ``start``."""
    video = clip.frames.copy()
    labels = clip.label_map()
    for t in range(start, len(video)):
        for src, dst in ((a, b), (b, a)):
            on = labels[t] == src
            region = video[t][on]
            for part in range(3):
                same = (region == clip.colours[src - 1, part]).all(-1)
                region[same] = clip.colours[dst - 1, part]
            video[t][on] = region
    return video


def test_exchanged_persons_raise_the_swap_rate_of_those_two(clip):
    labels = clip.label_map()
    swapped = _exchange_persons(clip, 1, 2, start=24)
    result = metrics.identity_swap_rate(swapped, labels, clip.frames[0], labels[0], 3, PROTOCOL)
    # every frame from 24 on (24 of 48) is a swap of 1 and 2, attributed to them; person 3 untouched
    assert result.per_person() == [0.5, 0.5, 0.0]
    assert result.swapped_with() == [2, 1, 0]
    assert result.pair_list() == [(1, 2, 48)]
    # no swap before frame 24: the swaps are all from the second half
    early = metrics.identity_swap_rate(swapped[:24], labels[:24], clip.frames[0], labels[0], 3, PROTOCOL)
    assert early.overall() == 0.0


def test_image_encoder_appearance_names_itself(clip):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    appearance = ImageEncoderAppearance(encoder, name="tiny random clip")
    labels = clip.label_map()
    protocol = Protocol(short_side=96, swap_crop=32)
    result = metrics.identity_swap_rate(clip.frames[:4], labels[:4], clip.frames[0], labels[0], 3, protocol, appearance)
    assert result.feature == "image-encoder: tiny random clip"
    assert result.judged.sum() > 0
    # frame 0 against itself: every person most like their own reference
    first = metrics.identity_swap_rate(clip.frames[:1], labels[:1], clip.frames[0], labels[0], 3, protocol, appearance)
    assert first.overall() == 0.0


# -------------------------------------------------------------------------- pose accuracy
def test_pck_counts_misplaced_and_missing_persons(clip):
    truth = _poses(clip, 0)
    labels = clip.label_map()
    gen = _poses(clip, 3)  # the same poses, rows in another order
    kp = gen.keypoints
    result = metrics.pck(kp, gen.scores, truth.keypoints, truth.scores, truth.pose_index, labels, 3, PROTOCOL)
    assert result.per_person() == [1.0, 1.0, 1.0]
    # drop person 2's detections: all of their judged keypoints are misses
    scores = gen.scores.copy()
    for t in range(len(scores)):
        if gen.pose_index[t, 1] >= 0:
            scores[t, gen.pose_index[t, 1]] = 0
    result = metrics.pck(kp, scores, truth.keypoints, truth.scores, truth.pose_index, labels, 3, PROTOCOL)
    # (a neighbour's row whose visible keypoints lie on person 2's pixels may stand in, rarely right)
    rates = result.per_person()
    assert rates[1] < 0.05 and rates[0] > 0.95 and rates[2] > 0.95 and result.judged[1] > 0
    # a 1 px shift stays within 0.1 x boxes of tens of pixels; 30 px is far outside
    shifted = np.where(gen.keypoints >= 0, gen.keypoints + np.float32(1.0), gen.keypoints)
    near = metrics.pck(shifted, gen.scores, truth.keypoints, truth.scores, truth.pose_index, labels, 3, PROTOCOL)
    assert near.overall() > 0.9
    moved = truth.keypoints.copy()
    moved[..., 1] = np.where(moved[..., 1] >= 0, moved[..., 1] + 30, moved[..., 1])
    far = metrics.pck(gen.keypoints, gen.scores, moved, truth.scores, truth.pose_index, labels, 3, PROTOCOL)
    assert far.overall() < 0.2


# ---------------------------------------------------------------------- background, seams
def test_background_stability_sees_flicker_outside_the_persons(clip):
    labels = clip.label_map()
    rng = np.random.default_rng(7)
    flicker = clip.frames.copy()
    bg = labels == 0
    noise = rng.integers(-25, 26, flicker.shape)
    flicker = np.where(bg[..., None], np.clip(flicker + noise, 0, 255), flicker).astype(np.uint8)
    gen, truth = metrics.background_stability(flicker, clip.frames, labels, PROTOCOL)
    assert gen > truth + 0.02


def test_window_joins_follow_the_release_windows():
    windows = latent_windows(41, 21, 4)
    assert windows == [list(range(21)), list(range(17, 38)), list(range(20, 41))]
    assert metrics.window_joins(windows, 161) == [65, 77, 81, 149]
    assert metrics.protocol_joins(161) == [65, 77, 81, 149]
    assert metrics.protocol_joins(81) == []


def test_seam_drift_measures_jumps_at_the_joins():
    frames = 161
    ramp = (np.arange(frames) % 200).astype(np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    joins = metrics.protocol_joins(frames)
    smooth = metrics.seam_drift(ramp, joins)
    assert smooth.drift == pytest.approx(1.0)
    jumpy = ramp.astype(int)
    for j in joins:
        jumpy[j:] += 5  # a step at every join
    jumpy = np.clip(jumpy, 0, 255).astype(np.uint8)
    seam = metrics.seam_drift(jumpy, joins)
    assert seam.joins == tuple(joins) and seam.drift == pytest.approx(6.0) and seam.within == pytest.approx(1 / 255)


# ---------------------------------------------------------------------------- conform
def test_conform_resamples_fps_length_and_size_and_says_so(clip):
    truth = clip.frames[:40]
    labels = clip.label_map()[:40]
    protocol = Protocol(short_side=48)
    # generated at 16 fps, 832x624 (a job's own size), 30 frames
    import cv2

    gen = np.stack([cv2.resize(f, (832, 624), interpolation=cv2.INTER_CUBIC) for f in truth[::1][:30]])
    truth_c, t_done, gen_c, g_done = metrics.conform_pair(truth, 25.0, gen, 16.0, protocol)
    assert t_done.size == (48, 64) and truth_c.shape == (40, 48, 64, 3)
    # 30 frames at 16 fps last 1.875 s = 47 frames at 25 fps, cut to the truth's 40
    assert g_done.frame_index[:6].tolist() == [0, 1, 1, 2, 3, 3] and gen_c.shape == truth_c.shape
    assert "fps 16 -> 25" in g_done.describe() and "resized 832x624 -> 64x48 (area)" in g_done.describe()
    assert "cut to 40 frames" in g_done.describe() and "resized 128x96 -> 64x48" in t_done.describe()
    assert t_done.labels(labels).shape == (40, 48, 64) and set(np.unique(t_done.labels(labels))) <= {0, 1, 2, 3}
    kp = np.array([[[[63.5, 47.5], [-1, -1]]]], np.float32).repeat(40, 0)
    conformed = t_done.keypoints(kp)
    assert conformed[0, 0, 0].tolist() == [31.5, 23.5] and conformed[0, 0, 1].tolist() == [-1, -1]
    # a shorter generated video: the common prefix, said in the truth's actions
    truth_c, t_done, gen_c, g_done = metrics.conform_pair(truth, 25.0, truth[:20], 25.0, protocol)
    assert len(truth_c) == len(gen_c) == 20 and "the generated video is shorter" in t_done.describe()
    assert metrics.describe_resampling(t_done, g_done).startswith("truth: resized")


# ----------------------------------------------------------------- records and networks
def test_scores_round_trip_through_parquet(tmp_path, truth_result):
    path = write_records([truth_result.scores], ClipScores, tmp_path / "clips.parquet")
    assert read_records(path, ClipScores) == [truth_result.scores]
    persons = truth_result.scores.persons()
    assert [p.person for p in persons] == [1, 2, 3] and persons[0].pck == 1.0
    summary = metrics.summarize([truth_result])
    assert read_records(write_records([summary], EvalSummary, tmp_path / "s.parquet"), EvalSummary) == [summary]


def test_protocol_is_frozen_and_versioned():
    p = Protocol()
    with pytest.raises(ValueError):
        p.fps = 30.0
    assert p.digest() == Protocol().digest() != Protocol(short_side=96).digest()
    assert p.version == PROTOCOL_VERSION
    with pytest.raises(ValueError, match="ssim_window"):
        Protocol(ssim_window=10)
    with pytest.raises(ValueError, match="together"):
        EvalNetworks(lpips_backbone_path="a.pth")


def test_missing_network_files_are_named_with_where_to_get_them(tmp_path):
    cfg = EvalNetworks(fvd_path=str(tmp_path / "i3d_pretrained_400.pt"), fid_vid_path=str(tmp_path / "r3d.pth"))
    with pytest.raises(ValueError) as info:
        load_eval_networks(cfg)
    message = str(info.value)
    assert "i3d_pretrained_400.pt" in message and "r3d.pth" in message
    assert "DisCo" in message and "3D-ResNets-PyTorch" in message and "nothing is downloaded" in message


def test_i3d_loads_an_old_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    source = InceptionI3d(400, width=1.0)
    # a DataParallel-era file: "module." prefixes, no num_batches_tracked, wrapped in "state_dict"
    state = {f"module.{k}": v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state}, tmp_path / "i3d.pt")
    nets = load_eval_networks(EvalNetworks(fvd_path=str(tmp_path / "i3d.pt")))
    assert "sha256:" in nets.fvd_name and "tiny random" in nets.describe() and nets.tiny
    for k, v in source.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(nets.fvd.state_dict()[k], v)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit InceptionI3d"):
        load_eval_networks(EvalNetworks(fvd_path=str(tmp_path / "other.pt")))
