"""The evaluation protocol's measures: plain functions on numpy arrays (data_schemas/evaluation.py
holds the protocol's constants and the score records).

Legend: videos uint8 [T, H, W, 3] RGB (0..255); label maps uint8 [T, H, W] (0 background,
k = person k, 1-based); keypoints float32 [T, P, 133, 2] (COCO-WholeBody, pixels, -1 = not
found) with scores [T, P, 133] and, for a clip's own poses, pose_index [T, K] (row of person
k in that frame, -1 = none), as data_schemas/pose.py and data_schemas/mask.py store them.

Order of use (``score_clip`` does it all): ``conform_pair`` brings the truth and the generated
video to the protocol's frame rate, frame range and size (saying what it did), then each
measure runs on the conformed arrays. FVD and FID-VID are distances between *sets*: each
clip gives its segments' features (``video_features``) and ``summarize`` takes the Frechet
distance over all clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from data_schemas.evaluation import PROTOCOL_VERSION, ClipScores, EvalSummary, Protocol
from model.feature_nets import R3D_MEAN
from model.pipeline import latent_windows  # the pipeline's own rule (spec D.8), not a copy

BODY_KEYPOINTS = np.arange(17)  # COCO-WholeBody 0..16
Appearance = Callable[[np.ndarray], np.ndarray]  # crops uint8 [N, S, S, 3] -> features [N, D]


def _check_video(video: np.ndarray, name: str) -> None:
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    _check_video(a, "generated")
    _check_video(b, "truth")
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape} (conform them first)")


# ------------------------------------------------------------------------------ conform
@dataclass(frozen=True)
class Conformed:
    """What the conform rule did to one video: which source frame each output frame is, and
    the resize. Apply the same to the video's label maps and keypoints."""

    source_size: tuple[int, int]  # (height, width)
    size: tuple[int, int]
    source_fps: float
    fps: float
    frame_index: np.ndarray  # int [T_out]: source frame of each output frame
    actions: tuple[str, ...] = ()

    @property
    def num_frames(self) -> int:
        return len(self.frame_index)

    def describe(self) -> str:
        return "; ".join(self.actions)

    def truncate(self, num_frames: int, why: str) -> Conformed:
        if num_frames >= self.num_frames:
            return self
        return Conformed(
            self.source_size,
            self.size,
            self.source_fps,
            self.fps,
            self.frame_index[:num_frames],
            self.actions + (f"cut to {num_frames} frames ({why})",),
        )

    def _resize(self, frame: np.ndarray, nearest: bool = False) -> np.ndarray:
        (h, w), (oh, ow) = frame.shape[:2], self.size
        if (h, w) == (oh, ow):
            return frame
        if nearest:
            interp = cv2.INTER_NEAREST
        else:
            interp = cv2.INTER_AREA if oh < h or ow < w else cv2.INTER_CUBIC
        return cv2.resize(frame, (ow, oh), interpolation=interp)

    def video(self, video: np.ndarray) -> np.ndarray:
        out = np.empty((self.num_frames, *self.size, 3), np.uint8)
        for i, src in enumerate(self.frame_index):
            out[i] = self._resize(video[src])
        return out

    def labels(self, label_map: np.ndarray) -> np.ndarray:
        """A label map of the source video, conformed (nearest: labels are never blended)."""
        out = np.empty((self.num_frames, *self.size), label_map.dtype)
        for i, src in enumerate(self.frame_index):
            out[i] = self._resize(label_map[src], nearest=True)
        return out

    def keypoints(self, keypoints: np.ndarray) -> np.ndarray:
        """Keypoints [T, P, N, 2] of the source video, conformed (pixel centres scale; -1 stays -1)."""
        kp = keypoints[self.frame_index].astype(np.float32, copy=True)
        missing = (kp < 0).any(-1)
        sy, sx = self.size[0] / self.source_size[0], self.size[1] / self.source_size[1]
        kp[..., 0] = (kp[..., 0] + 0.5) * sx - 0.5
        kp[..., 1] = (kp[..., 1] + 0.5) * sy - 0.5
        kp[missing] = -1
        return kp

    def frames(self, per_frame: np.ndarray) -> np.ndarray:
        """Any per-frame array (scores, pose_index) of the source video, conformed."""
        return per_frame[self.frame_index]

    def map_frames(self, source_frames: Sequence[int]) -> list[int]:
        """Source frame numbers (e.g. window joins) as output frame numbers: the first output
        frame taken from at or after each; those past the end are dropped."""
        out = []
        for j in source_frames:
            hits = np.nonzero(self.frame_index >= j)[0]
            if len(hits) and hits[0] > 0:
                out.append(int(hits[0]))
        return sorted(set(out))


def truth_size(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    """The compared size: the truth scaled, aspect kept, so its shorter side is protocol.short_side
    (the longer side rounded to even)."""
    scale = protocol.short_side / min(height, width)

    def even(n: int) -> int:
        return max(2, 2 * round(n * scale / 2))

    return (protocol.short_side, even(width)) if height <= width else (even(height), protocol.short_side)


def conform(
    video: np.ndarray,
    fps: float,
    protocol: Protocol = Protocol(),
    size: tuple[int, int] | None = None,
    num_frames: int | None = None,
) -> tuple[np.ndarray, Conformed]:
    """The protocol's resampling rule for one video: frame rate (nearest timestamp), frame range
    (start_frame, max_frames, and ``num_frames`` when another video sets the length), then size
    (``size``, else the truth rule ``truth_size``). Returns the new video and what was done."""
    _check_video(video, "video")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    num_src, h, w = video.shape[:3]
    actions: list[str] = []
    if abs(fps - protocol.fps) > 1e-6:
        n = max(1, math.ceil(num_src * protocol.fps / fps - 1e-9))
        index = np.minimum(np.floor(np.arange(n) * fps / protocol.fps + 0.5).astype(np.int64), num_src - 1)
        actions.append(f"fps {fps:g} -> {protocol.fps:g} by nearest timestamp ({num_src} -> {n} frames)")
    else:
        index = np.arange(num_src)
    if protocol.start_frame:
        index = index[protocol.start_frame :]
        actions.append(f"started at frame {protocol.start_frame}")
    limit = min(n for n in (protocol.max_frames, num_frames, len(index)) if n is not None)
    if limit < len(index):
        index = index[:limit]
        actions.append(f"cut to {limit} frames")
    if len(index) == 0:
        raise ValueError(f"no frame left to compare ({num_src} frames, start_frame {protocol.start_frame})")
    out_size = tuple(size) if size is not None else truth_size(h, w, protocol)
    if out_size != (h, w):
        how = protocol.resize_down if out_size[0] < h or out_size[1] < w else protocol.resize_up
        actions.append(f"resized {w}x{h} -> {out_size[1]}x{out_size[0]} ({how})")
    done = Conformed((h, w), out_size, float(fps), protocol.fps, index, tuple(actions))
    return done.video(video), done


def conform_pair(
    truth: np.ndarray, truth_fps: float, generated: np.ndarray, generated_fps: float, protocol: Protocol = Protocol()
) -> tuple[np.ndarray, Conformed, np.ndarray, Conformed]:
    """Both videos by the protocol's rule: the truth sets size and length; a shorter generated
    video is compared on the common prefix (never padded: repeated frames would fake a frozen video)."""
    truth_c, t_done = conform(truth, truth_fps, protocol)
    gen_c, g_done = conform(generated, generated_fps, protocol, size=t_done.size, num_frames=t_done.num_frames)
    if g_done.num_frames < t_done.num_frames:
        t_done = t_done.truncate(g_done.num_frames, "the generated video is shorter")
        truth_c = truth_c[: g_done.num_frames]
    return truth_c, t_done, gen_c, g_done


def describe_resampling(truth: Conformed, generated: Conformed) -> str:
    parts = [
        f"truth: {truth.describe()}" if truth.actions else "",
        f"generated: {generated.describe()}" if generated.actions else "",
    ]
    return " | ".join(p for p in parts if p)


# ------------------------------------------------------------------------- PSNR / SSIM
def _psnr_of_mse(mse: float, protocol: Protocol) -> float:
    if mse <= 0:
        return protocol.psnr_max_db
    return float(min(protocol.psnr_max_db, 10.0 * math.log10(255.0**2 / mse)))


def psnr_frames(generated: np.ndarray, truth: np.ndarray, protocol: Protocol = Protocol()) -> np.ndarray:
    """PSNR of each frame in dB (all pixels and channels; data range 255; capped at psnr_max_db)."""
    _check_pair(generated, truth)
    diff = generated.astype(np.float64) - truth.astype(np.float64)
    mse = (diff * diff).reshape(len(diff), -1).mean(1)
    return np.array([_psnr_of_mse(m, protocol) for m in mse])


def psnr(generated: np.ndarray, truth: np.ndarray, protocol: Protocol = Protocol()) -> float:
    """Mean of the per-frame PSNRs."""
    return float(psnr_frames(generated, truth, protocol).mean())


def _gaussian(protocol: Protocol) -> np.ndarray:
    r = protocol.ssim_window // 2
    g = np.exp(-(np.arange(-r, r + 1, dtype=np.float64) ** 2) / (2 * protocol.ssim_sigma**2))
    return g / g.sum()


def ssim_maps(generated: np.ndarray, truth: np.ndarray, protocol: Protocol = Protocol()) -> np.ndarray:
    """SSIM map of each frame, averaged over RGB: float [T, H - 2r, W - 2r] (r = half the window;
    border pixels whose window leaves the frame are dropped, as skimage does)."""
    _check_pair(generated, truth)
    g = _gaussian(protocol)
    r = protocol.ssim_window // 2
    c1, c2 = (protocol.ssim_k1 * 255.0) ** 2, (protocol.ssim_k2 * 255.0) ** 2
    t, h, w = truth.shape[:3]
    if h <= 2 * r or w <= 2 * r:
        raise ValueError(f"frames of {w}x{h} are smaller than the SSIM window ({protocol.ssim_window})")

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.sepFilter2D(x, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)[r : h - r, r : w - r]

    out = np.zeros((t, h - 2 * r, w - 2 * r))
    for i in range(t):
        for ch in range(3):
            x = generated[i, :, :, ch].astype(np.float64)
            y = truth[i, :, :, ch].astype(np.float64)
            mx, my = blur(x), blur(y)
            sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
            out[i] += ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return out / 3.0


def ssim(generated: np.ndarray, truth: np.ndarray, protocol: Protocol = Protocol()) -> float:
    """Mean over frames of each frame's mean SSIM."""
    return float(ssim_maps(generated, truth, protocol).reshape(len(truth), -1).mean(1).mean())


def person_psnr(
    generated: np.ndarray, truth: np.ndarray, labels: np.ndarray, num_persons: int, protocol: Protocol = Protocol()
) -> list[float | None]:
    """Per person: PSNR of the pixels of the person in the truth label map, all frames pooled."""
    _check_pair(generated, truth)
    diff = generated.astype(np.float64) - truth.astype(np.float64)
    sq = (diff * diff).mean(-1)
    out: list[float | None] = []
    for k in range(1, num_persons + 1):
        on = labels == k
        out.append(_psnr_of_mse(float(sq[on].mean()), protocol) if on.any() else None)
    return out


def person_ssim(
    maps: np.ndarray, labels: np.ndarray, num_persons: int, protocol: Protocol = Protocol()
) -> list[float | None]:
    """Per person: mean of the SSIM maps (ssim_maps) over the person's pixels."""
    r = protocol.ssim_window // 2
    inner = labels[:, r : labels.shape[1] - r, r : labels.shape[2] - r]
    return [float(maps[inner == k].mean()) if (inner == k).any() else None for k in range(1, num_persons + 1)]


# -------------------------------------------------------------------------------- LPIPS
@torch.no_grad()
def lpips_frames(generated: np.ndarray, truth: np.ndarray, net: torch.nn.Module, batch_size: int = 8) -> np.ndarray:
    """LPIPS of each frame (inputs scaled to [-1, 1] at the compared size)."""
    _check_pair(generated, truth)
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(truth), batch_size):
        a, b = (
            torch.from_numpy(np.ascontiguousarray(v[i : i + batch_size])).to(device).permute(0, 3, 1, 2).float() / 127.5
            - 1.0
            for v in (generated, truth)
        )
        out.append(net(a, b).double().cpu().numpy())
    return np.concatenate(out)


def lpips(generated: np.ndarray, truth: np.ndarray, net: torch.nn.Module, batch_size: int = 8) -> float:
    """Mean of the per-frame LPIPS."""
    return float(lpips_frames(generated, truth, net, batch_size).mean())


# ------------------------------------------------------------------- Frechet, FVD, FID-VID
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance of two Gaussians fitted to feature sets [N, D] (unbiased covariances):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)).

    tr(sqrt(S_a S_b)) is computed without a general matrix square root: with fewer samples than
    dimensions as the nuclear norm of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)) (X: centred features; the
    nonzero eigenvalues of S_a S_b are the squared singular values of that matrix), else from the
    eigenvalues of the symmetric sqrt(S_a) S_b sqrt(S_a). Both are exact for singular covariances
    (few clips, many features), where scipy's sqrtm is unstable, and identical sets give 0."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    xa, xb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    diff = a.mean(0) - b.mean(0)
    tr_a, tr_b = float((xa * xa).sum() / na), float((xb * xb).sum() / nb)
    if min(len(a), len(b)) <= a.shape[1]:
        tr_sqrt = float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / math.sqrt(na * nb))
    else:
        sa, sb = xa.T @ xa / na, xb.T @ xb / nb
        w, v = np.linalg.eigh(sa)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root_a @ sb @ root_a
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    # rounding can leave -1e-12 for identical sets
    return max(0.0, float(diff @ diff) + tr_a + tr_b - 2.0 * tr_sqrt)


def fvd(truth_features: np.ndarray, generated_features: np.ndarray) -> float | None:
    """FVD: the Frechet distance of I3D features of the truth's and the generated segments
    (None with fewer than 2 segments a side)."""
    if min(len(truth_features), len(generated_features)) < 2:
        return None
    return frechet_distance(truth_features, generated_features)


fid_vid = fvd  # the same distance, on the 3-D ResNet-50's features (video_features(..., "fid_vid"))


def video_segments(video: np.ndarray, frames: int) -> np.ndarray:
    """Non-overlapping segments of ``frames`` frames from frame 0, the remainder dropped:
    [N, frames, H, W, 3]."""
    n = len(video) // frames
    return video[: n * frames].reshape(n, frames, *video.shape[1:])


def _squash(frame: np.ndarray, side: int) -> np.ndarray:
    # bicubic per channel in float (PIL "F" mode, as clean-fid's resizer that DisCo uses): no rounding
    if frame.shape[:2] == (side, side):
        return frame.astype(np.float32)
    return np.stack(
        [
            np.asarray(Image.fromarray(frame[..., c].astype(np.float32), mode="F").resize((side, side), Image.BICUBIC))
            for c in range(3)
        ],
        -1,
    )


@torch.no_grad()
def video_features(
    video: np.ndarray, net: torch.nn.Module, which: str, protocol: Protocol = Protocol(), batch_size: int = 4
) -> np.ndarray:
    """Features of a video's segments for FVD (``which="fvd"``: I3D, fvd_size, [-1, 1]) or FID-VID
    (``"fid_vid"``: 3-D ResNet-50, fid_vid_size, 0..255 minus the Kinetics mean): [N, D]."""
    _check_video(video, "video")
    if which == "fvd":
        side, frames = protocol.fvd_size, protocol.fvd_frames
    elif which == "fid_vid":
        side, frames = protocol.fid_vid_size, protocol.fid_vid_frames
    else:
        raise ValueError(f"which must be 'fvd' or 'fid_vid', got {which!r}")
    segments = video_segments(video, frames)
    param = next(net.parameters())
    out = []
    for i in range(0, len(segments), batch_size):
        chunk = segments[i : i + batch_size]
        x = np.stack([[_squash(f, side) for f in seg] for seg in chunk])  # [B, T, S, S, 3] float 0..255
        x = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
        if which == "fvd":
            x = x / 127.5 - 1.0
        else:
            x = x - torch.tensor(R3D_MEAN, dtype=x.dtype).view(1, 3, 1, 1, 1)
        out.append(net(x.to(device=param.device, dtype=param.dtype)).double().cpu().numpy())
    dim = 400 if which == "fvd" else 2048
    return np.concatenate(out) if out else np.zeros((0, dim))


# ------------------------------------------------------------------------- pose accuracy
def _found(keypoints: np.ndarray, scores: np.ndarray, protocol: Protocol) -> np.ndarray:
    return (scores >= protocol.pck_score_threshold) & (keypoints >= 0).all(-1)


def match_detections(
    keypoints: np.ndarray, scores: np.ndarray, labels: np.ndarray, num_persons: int, protocol: Protocol = Protocol()
) -> np.ndarray:
    """Re-detected poses matched to the driving persons by the label map: each found body keypoint
    votes for the label under it; rows and persons are paired to maximise the votes (Hungarian),
    pairs without a vote dropped. Returns int [T, K]: the row of person k, -1 = none."""
    t_n, h, w = labels.shape
    match = np.full((t_n, num_persons), -1, np.int64)
    kp, sc = keypoints[:, :, BODY_KEYPOINTS], scores[:, :, BODY_KEYPOINTS]
    found = _found(kp, sc, protocol)
    for t in range(t_n):
        rows = kp.shape[1]
        votes = np.zeros((rows, num_persons), np.int64)
        for r in range(rows):
            pts = np.rint(kp[t, r][found[t, r]]).astype(np.int64)
            inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
            lab = labels[t, pts[inside, 1], pts[inside, 0]]
            votes[r] = np.bincount(lab, minlength=num_persons + 1)[1 : num_persons + 1]
        if votes.any():
            ri, ki = linear_sum_assignment(-votes)
            for r, k in zip(ri, ki):
                if votes[r, k] > 0:
                    match[t, k] = r
    return match


@dataclass(frozen=True)
class PckResult:
    hits: np.ndarray  # int [K]: judged keypoints placed correctly
    judged: np.ndarray  # int [K]: found truth keypoints judged

    def per_person(self) -> list[float | None]:
        return [float(h / j) if j else None for h, j in zip(self.hits, self.judged)]

    def overall(self) -> float | None:
        return float(self.hits.sum() / self.judged.sum()) if self.judged.sum() else None


def pck(
    generated_keypoints: np.ndarray,
    generated_scores: np.ndarray,
    truth_keypoints: np.ndarray,
    truth_scores: np.ndarray,
    truth_pose_index: np.ndarray | None,
    labels: np.ndarray,
    num_persons: int,
    protocol: Protocol = Protocol(),
) -> PckResult:
    """PCK per person: of the person's found truth body keypoints (score >= pck_score_threshold),
    the share the re-detection matched to that person (``match_detections``) places within
    pck_alpha x the longer side of the box around the found truth keypoints. A person without
    a matched detection misses every judged keypoint of that frame. ``truth_pose_index`` None:
    truth row k - 1 is person k."""
    match = match_detections(generated_keypoints, generated_scores, labels, num_persons, protocol)
    hits, judged = np.zeros(num_persons, np.int64), np.zeros(num_persons, np.int64)
    gen_found = _found(generated_keypoints[:, :, BODY_KEYPOINTS], generated_scores[:, :, BODY_KEYPOINTS], protocol)
    for t in range(len(labels)):
        for k in range(num_persons):
            row = k if truth_pose_index is None else int(truth_pose_index[t, k])
            if row < 0 or row >= truth_keypoints.shape[1]:
                continue
            kp = truth_keypoints[t, row, BODY_KEYPOINTS]
            ok = _found(kp, truth_scores[t, row, BODY_KEYPOINTS], protocol)
            if ok.sum() < 2:
                continue
            pts = kp[ok]
            norm = float((pts.max(0) - pts.min(0)).max())
            if norm <= 0:
                continue
            judged[k] += int(ok.sum())
            g = match[t, k]
            if g < 0:
                continue
            gk = generated_keypoints[t, g, BODY_KEYPOINTS][ok]
            dist = np.linalg.norm(gk - pts, axis=-1)
            hits[k] += int((gen_found[t, g][ok] & (dist <= protocol.pck_alpha * norm)).sum())
    return PckResult(hits, judged)


# ------------------------------------------------------------------------- identity swaps
def _region_crop(frame: np.ndarray, mask: np.ndarray, side: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.where(mask[y0:y1, x0:x1, None], frame[y0:y1, x0:x1], np.uint8(128))
    interp = cv2.INTER_AREA if (y1 - y0) > side or (x1 - x0) > side else cv2.INTER_CUBIC
    return cv2.resize(crop, (side, side), interpolation=interp)


def _histogram(pixels: np.ndarray, bins: int) -> np.ndarray:
    q = (pixels.astype(np.int64) * bins) // 256
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    return h / h.sum()


@dataclass(frozen=True)
class SwapResult:
    feature: str  # the appearance feature used
    judged: np.ndarray  # int [K]: frames judged per person
    swapped: np.ndarray  # int [K]: frames judged a swap
    pairs: np.ndarray  # int [K, K]: pairs[k, j] = frames person k+1 looked most like person j+1 (k != j)

    def per_person(self) -> list[float | None]:
        return [float(s / j) if j else None for s, j in zip(self.swapped, self.judged)]

    def overall(self) -> float | None:
        return float(self.swapped.sum() / self.judged.sum()) if self.judged.sum() else None

    def swapped_with(self) -> list[int]:
        return [int(np.argmax(row)) + 1 if row.any() else 0 for row in self.pairs]

    def pair_list(self) -> list[tuple[int, int, int]]:
        """(a, b, frames) for every pair a < b that swapped, frames = both directions."""
        both = self.pairs + self.pairs.T
        k = len(both)
        return [(a + 1, b + 1, int(both[a, b])) for a in range(k) for b in range(a + 1, k) if both[a, b]]


def identity_swap_rate(
    video: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    reference_labels: np.ndarray,
    num_persons: int,
    protocol: Protocol = Protocol(),
    appearance: Appearance | None = None,
    appearance_name: str = "",
) -> SwapResult:
    """How often a person's generated region (pixels of label k in the truth label map) looks more
    like another person's reference (their pixels in the reference image) than their own, by more
    than swap_margin. Features: ``appearance`` (the profile's image encoder on grey-filled crops,
    cosine similarity) or, when None, the joint RGB colour histogram (Bhattacharyya coefficient).
    Persons whose reference region is under swap_min_pixels are neither judged nor candidates."""
    _check_video(video, "video")
    k_n = num_persons
    use_encoder = appearance is not None and protocol.swap_feature == "image-encoder"
    feature = (
        (appearance_name or getattr(appearance, "name", "image-encoder"))
        if use_encoder
        else f"colour-histogram-{protocol.swap_hist_bins}"
    )
    ref_ok = np.array([(reference_labels == k).sum() >= protocol.swap_min_pixels for k in range(1, k_n + 1)])
    items = [
        (t, k)
        for t in range(len(video))
        for k in range(k_n)
        if ref_ok[k] and (labels[t] == k + 1).sum() >= protocol.swap_min_pixels
    ]
    judged, swapped = np.zeros(k_n, np.int64), np.zeros(k_n, np.int64)
    pairs = np.zeros((k_n, k_n), np.int64)
    if not items or ref_ok.sum() < 2:
        for t, k in items:
            judged[k] += 1
        return SwapResult(feature, judged, swapped, pairs)
    refs_k = [k for k in range(k_n) if ref_ok[k]]
    if use_encoder:
        crops = [_region_crop(reference, reference_labels == k + 1, protocol.swap_crop) for k in refs_k]
        crops += [_region_crop(video[t], labels[t] == k + 1, protocol.swap_crop) for t, k in items]
        feats = np.asarray(appearance(np.stack(crops)), np.float64)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
        sims = feats[len(refs_k) :] @ feats[: len(refs_k)].T
    else:
        bins = protocol.swap_hist_bins
        ref_h = np.stack([_histogram(reference[reference_labels == k + 1], bins) for k in refs_k])
        gen_h = np.stack([_histogram(video[t][labels[t] == k + 1], bins) for t, k in items])
        sims = np.sqrt(gen_h) @ np.sqrt(ref_h).T
    col = {k: i for i, k in enumerate(refs_k)}
    for (t, k), s in zip(items, sims):
        judged[k] += 1
        own = s[col[k]]
        others = [(s[col[j]], j) for j in refs_k if j != k]
        best, j = max(others)
        if best > own + protocol.swap_margin:
            swapped[k] += 1
            pairs[k, j] += 1
    return SwapResult(feature, judged, swapped, pairs)


# ---------------------------------------------------------------------------- background
def _grown(labels: np.ndarray, margin: int) -> np.ndarray:
    persons = (labels > 0).astype(np.uint8)
    if margin <= 0:
        return persons.astype(bool)
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return np.stack([cv2.dilate(p, kernel) for p in persons]).astype(bool)


def background_change(video: np.ndarray, labels: np.ndarray, protocol: Protocol = Protocol()) -> float | None:
    """Mean |frame t - frame t-1| / 255 (channels averaged) over the pixels outside every person
    mask grown by background_margin_px in both frames, all frame pairs pooled (None: no such pixel)."""
    _check_video(video, "video")
    grown = _grown(labels, protocol.background_margin_px)
    total, count = 0.0, 0
    for t in range(1, len(video)):
        bg = ~(grown[t] | grown[t - 1])
        n = int(bg.sum())
        if n:
            d = np.abs(video[t].astype(np.int16) - video[t - 1].astype(np.int16)).mean(-1)
            total += float(d[bg].sum())
            count += n
    return total / count / 255.0 if count else None


def background_stability(
    generated: np.ndarray, truth: np.ndarray, labels: np.ndarray, protocol: Protocol = Protocol()
) -> tuple[float | None, float | None]:
    """(generated, truth) background change on the same pixels: the truth's is the camera's and the
    scene's own motion, the excess is the model's."""
    _check_pair(generated, truth)
    return background_change(generated, labels, protocol), background_change(truth, labels, protocol)


# ------------------------------------------------------------------------------- seams
def window_joins(windows: Sequence[Sequence[int]], num_frames: int) -> list[int]:
    """Frames where the set of windows covering a frame changes (latent 0 is frame 0, latent j >= 1
    frames 4j-3..4j): a window's first frame and the frame after the previous window's last."""
    joins = set()
    for w in windows[1:]:
        joins.add(0 if w[0] == 0 else 4 * w[0] - 3)
    for w in windows[:-1]:
        joins.add(4 * w[-1] + 1)
    return sorted(j for j in joins if 1 <= j < num_frames)


def protocol_joins(num_frames: int, protocol: Protocol = Protocol()) -> list[int]:
    """Joins of a video generated with the protocol's (the release's) windows."""
    num_latents = (num_frames - 1) // 4 + 1
    windows = latent_windows(num_latents, protocol.seam_window_latents, protocol.seam_overlap_latents)
    return window_joins(windows, num_frames)


def frame_changes(video: np.ndarray) -> np.ndarray:
    """Mean |frame i+1 - frame i| / 255 over pixels and channels: [T - 1]."""
    v = video.astype(np.int16)
    return np.abs(v[1:] - v[:-1]).reshape(len(v) - 1, -1).mean(1) / 255.0


@dataclass(frozen=True)
class SeamResult:
    joins: tuple[int, ...]
    jump: float | None  # mean change across the joins
    within: float | None  # median change away from them
    drift: float | None  # jump / within


def seam_drift(video: np.ndarray, joins: Sequence[int], protocol: Protocol = Protocol()) -> SeamResult:
    """The jump at window joins against the within-window frame differences: mean change between
    frames j-1 and j over the joins, divided by the median change of the frame pairs more than
    seam_guard_frames from every join (1: no seam; None without joins or baseline)."""
    _check_video(video, "video")
    joins = tuple(j for j in joins if 1 <= j < len(video))
    if not joins:
        return SeamResult((), None, None, None)
    d = frame_changes(video)
    jump = float(np.mean([d[j - 1] for j in joins]))
    # pair i is between frames i and i+1; a join j is pair j-1
    far = [i for i in range(len(d)) if all(abs(i - (j - 1)) > protocol.seam_guard_frames for j in joins)]
    within = float(np.median(d[far])) if far else None
    drift = jump / within if within else None
    return SeamResult(joins, jump, within, drift)


# ----------------------------------------------------------------------------- one clip
@dataclass(frozen=True)
class Poses:
    """A video's poses in the pose stage's layout (pose_index only for the truth's own poses)."""

    keypoints: np.ndarray  # [T, P, 133, 2]
    scores: np.ndarray  # [T, P, 133]
    pose_index: np.ndarray | None = None  # [T, K]


@dataclass
class ClipResult:
    scores: ClipScores
    truth_features: dict[str, np.ndarray] = field(default_factory=dict)  # "fvd" / "fid_vid" -> [N, D]
    generated_features: dict[str, np.ndarray] = field(default_factory=dict)


def score_clip(
    clip_id: str,
    truth: np.ndarray,
    truth_fps: float,
    generated: np.ndarray,
    generated_fps: float,
    labels: np.ndarray,
    nets,
    protocol: Protocol = Protocol(),
    *,
    truth_poses: Poses | None = None,
    generated_poses: Poses | None = None,
    reference: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    appearance: Appearance | None = None,
    windows: Sequence[Sequence[int]] | None = None,
    num_persons: int | None = None,
) -> ClipResult:
    """Every measure of one clip. ``labels``: the truth's label map (the driving persons);
    ``nets``: model.feature_nets.EvalNets; ``reference`` (+ ``reference_labels``): the image the
    video was generated from, default the first compared truth frame; ``windows``: the latent
    windows the generation used (default: the protocol's); poses as the pose stage writes them
    (the generated video's re-detected, the truth's with pose_index); ``num_persons``: the masks'
    K (default: the highest label present)."""
    if labels.shape[:3] != truth.shape[:3]:
        raise ValueError(f"labels {labels.shape} do not match the truth {truth.shape}")
    truth_c, t_done, gen_c, g_done = conform_pair(truth, truth_fps, generated, generated_fps, protocol)
    lab = t_done.labels(labels)
    k_n = num_persons if num_persons is not None else (int(labels.max()) if labels.size else 0)
    maps = ssim_maps(gen_c, truth_c, protocol)
    if reference is None:
        ref, ref_lab = truth_c[0], lab[0]
    else:
        if reference_labels is None:
            raise ValueError("reference_labels must come with reference")
        size = t_done.size
        ref = cv2.resize(reference, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        ref_lab = cv2.resize(reference_labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    swaps = identity_swap_rate(gen_c, lab, ref, ref_lab, k_n, protocol, appearance)
    if truth_poses is not None and generated_poses is not None:
        pose_index = t_done.frames(truth_poses.pose_index) if truth_poses.pose_index is not None else None
        pcks = pck(
            g_done.keypoints(generated_poses.keypoints),
            g_done.frames(generated_poses.scores),
            t_done.keypoints(truth_poses.keypoints),
            t_done.frames(truth_poses.scores),
            pose_index,
            lab,
            k_n,
            protocol,
        )
    else:
        pcks = PckResult(np.zeros(k_n, np.int64), np.zeros(k_n, np.int64))
    bg_gen, bg_truth = background_stability(gen_c, truth_c, lab, protocol)
    if windows is not None:
        joins = g_done.map_frames(window_joins(windows, len(generated)))
    else:
        joins = protocol_joins(len(gen_c), protocol)
    seam_g, seam_t = seam_drift(gen_c, joins, protocol), seam_drift(truth_c, joins, protocol)
    t_feats = {w: video_features(truth_c, getattr(nets, w), w, protocol) for w in ("fvd", "fid_vid")}
    g_feats = {w: video_features(gen_c, getattr(nets, w), w, protocol) for w in ("fvd", "fid_vid")}
    pairs = swaps.pair_list()
    scores = ClipScores(
        clip_id=clip_id,
        protocol_version=PROTOCOL_VERSION,
        protocol_digest=protocol.digest(),
        networks=nets.describe(),
        tiny_networks=nets.tiny,
        resampling=describe_resampling(t_done, g_done),
        num_frames=len(truth_c),
        width=t_done.size[1],
        height=t_done.size[0],
        fps=protocol.fps,
        psnr=psnr(gen_c, truth_c, protocol),
        ssim=float(maps.reshape(len(maps), -1).mean(1).mean()),
        lpips=lpips(gen_c, truth_c, nets.lpips),
        num_video_segments=len(t_feats["fvd"]),
        num_persons=k_n,
        person_psnr=tuple(person_psnr(gen_c, truth_c, lab, k_n, protocol)),
        person_ssim=tuple(person_ssim(maps, lab, k_n, protocol)),
        person_pck=tuple(pcks.per_person()),
        person_pck_keypoints=tuple(int(j) for j in pcks.judged),
        person_swap_rate=tuple(swaps.per_person()),
        person_swap_frames=tuple(int(s) for s in swaps.swapped),
        person_judged_frames=tuple(int(j) for j in swaps.judged),
        person_swapped_with=tuple(swaps.swapped_with()),
        swap_feature=swaps.feature,
        swap_persons_a=tuple(p[0] for p in pairs),
        swap_persons_b=tuple(p[1] for p in pairs),
        swap_pair_frames=tuple(p[2] for p in pairs),
        pck=pcks.overall(),
        swap_rate=swaps.overall(),
        background_change=bg_gen,
        background_change_truth=bg_truth,
        seam_joins=seam_g.joins,
        seam_jump=seam_g.jump,
        seam_within=seam_g.within,
        seam_drift=seam_g.drift,
        seam_drift_truth=seam_t.drift,
    )
    return ClipResult(scores, t_feats, g_feats)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarize(results: Sequence[ClipResult]) -> EvalSummary:
    """The measures over a set of clips: means of the per-clip measures, PCK and swap rate pooled
    over every judgement, FVD and FID-VID over every clip's segments."""
    if not results:
        raise ValueError("nothing to summarize")
    clips = [r.scores for r in results]
    first = clips[0]
    for c in clips[1:]:
        if (c.protocol_digest, c.networks) != (first.protocol_digest, first.networks):
            raise ValueError(f"clip {c.clip_id} was scored under another protocol or networks than {first.clip_id}")

    def stack(side: str, which: str) -> np.ndarray:
        arrays = [getattr(r, side)[which] for r in results if len(getattr(r, side).get(which, ()))]
        return np.concatenate(arrays) if arrays else np.zeros((0, 1))

    hits = sum(round(p * n) for c in clips for p, n in zip(c.person_pck, c.person_pck_keypoints) if p is not None)
    judged = sum(sum(c.person_pck_keypoints) for c in clips)
    swapped = sum(sum(c.person_swap_frames) for c in clips)
    swap_judged = sum(sum(c.person_judged_frames) for c in clips)
    seams = [c for c in clips if c.seam_drift is not None]
    return EvalSummary(
        protocol_version=first.protocol_version,
        protocol_digest=first.protocol_digest,
        networks=first.networks,
        tiny_networks=first.tiny_networks,
        num_clips=len(clips),
        num_video_segments=sum(c.num_video_segments for c in clips),
        psnr=_mean([c.psnr for c in clips]),
        ssim=_mean([c.ssim for c in clips]),
        lpips=_mean([c.lpips for c in clips]),
        fvd=fvd(stack("truth_features", "fvd"), stack("generated_features", "fvd")),
        fid_vid=fid_vid(stack("truth_features", "fid_vid"), stack("generated_features", "fid_vid")),
        pck=hits / judged if judged else None,
        swap_rate=swapped / swap_judged if swap_judged else None,
        swap_features=", ".join(sorted({c.swap_feature for c in clips})),
        background_change=_mean([c.background_change for c in clips]),
        background_change_truth=_mean([c.background_change_truth for c in clips]),
        seam_drift=_mean([c.seam_drift for c in seams]),
        seam_drift_truth=_mean([c.seam_drift_truth for c in seams]),
    )
