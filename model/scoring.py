"""Held-out evaluation as plain functions: the workspace's held-out clips, the videos decoded
under the ingest policy, one clip scored by the protocol (model/metrics.py), the outputs
(per_clip.parquet, metrics.parquet, a preview), and two evaluations compared.

The held-out clips are the ``val`` split of shards/index.parquet (split per source video:
never trained on). A generated video is untrusted input: it is probed and decoded by ffmpeg
in a killable child process, and only a clean decode is scored (``VideoUnusable`` otherwise,
a row with its reason). The truth goes through the same decoder, so a truth clip scored
against itself is exact (PSNR = psnr_max_db).

    ws = Workspace(Path("workspace"))
    items = [score_item_for(ws, s, Path("videos") / f"{s.key}.mp4") for s in held_out_clips(ws)]
    nets = eval_networks(EvalNetworks())
    outcomes = [score_item(i, Protocol(), nets) for i in items if i is not None]
    write_outputs(ws, "mine", outcomes, Protocol(), nets.describe())
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from data_schemas.arrays import read_npz
from data_schemas.atomic import atomic_write_bytes
from data_schemas.config import PoseConfig
from data_schemas.evaluation import (
    PROTOCOL_VERSION,
    ClipScores,
    EvalConfig,
    EvalNetworks,
    EvalRow,
    EvalStatus,
    EvalSummary,
    Protocol,
)
from data_schemas.io import read_records, write_records
from data_schemas.job import JobSpec
from data_schemas.model import ModelConfig
from data_schemas.shard import ShardSample
from data_schemas.workspace import Workspace
from model import metrics
from model.feature_nets import EvalNets, load_eval_networks
from preprocess import media

DECODE_TIMEOUT_S = 600.0  # per video, probe and decode each
MAX_DECODE_BYTES = 8 * 2**30  # RGB frames held in memory for one video at most
BASE = "base"  # --checkpoint base: the profile's model without fine-tuned weights
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class VideoUnusable(ValueError):
    """A generated video that cannot be scored: ``status`` missing or undecodable."""

    def __init__(self, status: EvalStatus, message: str):
        super().__init__(message)
        self.status = status


def check_name(name: str) -> str:
    """An evaluation's name is one folder under evals/."""
    if not _NAME.match(name):
        raise ValueError(f"evaluation name {name!r}: use letters, digits, '.', '_' and '-' (a folder name)")
    return name


# ------------------------------------------------------------------------------ held-out clips
def held_out_clips(workspace: Workspace | Path) -> list[ShardSample]:
    """The ``val`` samples of the current shard set, by clip id."""
    ws = Workspace.of(workspace)
    if not ws.shards_index.is_file():
        raise ValueError(f"{ws.shards_index}: missing; `multianimate preprocess` writes the shards and their split")
    samples = [s for s in read_records(ws.shards_index, ShardSample) if s.split == "val"]
    if not samples:
        raise ValueError(
            f"{ws.shards_index}: no held-out (val) sample; raise shards.val_fraction and run preprocess again"
        )
    return sorted(samples, key=lambda s: s.key)


# -------------------------------------------------------------------------------- decoding
def decode_video(path: Path, timeout: float = DECODE_TIMEOUT_S) -> tuple[np.ndarray, float]:
    """Every frame of a video as uint8 [T, H, W, 3] RGB (rotation applied) and its frame rate.
    ``VideoUnusable`` when it is missing or does not decode cleanly (any error of the demuxer or
    decoder: a truncated file is refused, not scored on its first half); ``MediaTimeout`` (a
    passing failure) when ffmpeg does not answer in time."""
    path = Path(path)
    if not path.is_file():
        raise VideoUnusable("missing", f"{path}: no such video")
    try:
        info = media.probe(path, timeout)
    except media.MediaTimeout:
        raise
    except media.MediaError as exc:
        raise VideoUnusable("undecodable", str(exc)) from exc
    fps = info.avg_fps or info.r_fps
    width, height = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)
    if not fps or width <= 0 or height <= 0:
        raise VideoUnusable("undecodable", f"{path}: no frame rate or size ({info.codec} {width}x{height})")
    claimed = (info.duration_s or 0.0) * fps * width * height * 3
    if claimed > MAX_DECODE_BYTES:
        raise VideoUnusable("undecodable", f"{path}: {claimed / 2**30:.1f} GiB of frames, over the limit of 8 GiB")
    args = ["ffmpeg", "-nostdin", "-v", "error", "-i", media.input_url(path), "-map", "0:v:0", "-an"]
    args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    done = media.run_tool(args, timeout, f"decoding {path}")
    media.raise_for_environment(done, f"decoding {path}")
    frame_bytes = width * height * 3
    if done.returncode != 0 or done.stderr.strip():
        raise VideoUnusable("undecodable", f"{path}: not a clean decode ({media.last_error_line(done.stderr)})")
    if not done.stdout or len(done.stdout) % frame_bytes:
        raise VideoUnusable("undecodable", f"{path}: no whole frame of {width}x{height} decoded")
    frames = np.frombuffer(done.stdout, np.uint8).reshape(-1, height, width, 3)
    return frames, float(fps)


# ---------------------------------------------------------------------------- one clip
class ScoreItem(BaseModel):
    """One generated video and the truth it is scored against (paths and their contents' sha256:
    the scoring task's cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="the held-out clip")
    truth: Path = Field(description="the truth clip")
    truth_sha256: str = Field(description="its content")
    masks: Path = Field(description="the truth's label map (segment stage npz)")
    masks_sha256: str = Field(description="its content")
    poses: Path = Field(description="the truth's poses (pose stage npz)")
    poses_sha256: str = Field(description="its content")
    generated: Path = Field(description="the generated video")
    generated_sha256: str = Field(description="its content")


def _sha256(path: Path) -> str:
    from preprocess.video import sha256_file

    return sha256_file(path)


def score_item_for(workspace: Workspace | Path, sample: ShardSample, generated: Path) -> ScoreItem | None:
    """The item of one held-out clip and its generated video; None when the video is missing."""
    ws = Workspace.of(workspace)
    if not Path(generated).is_file():
        return None
    files = {"truth": ws.clip_file(sample.key), "masks": ws.mask_file(sample.key), "poses": ws.pose_file(sample.key)}
    return ScoreItem(
        clip_id=sample.key,
        generated=Path(generated),
        generated_sha256=_sha256(Path(generated)),
        **files,
        **{f"{k}_sha256": _sha256(p) for k, p in files.items()},
    )


class ScoredClip(BaseModel):
    """What scoring one clip gave: its scores and FVD/FID-VID features, or why it has none."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="the held-out clip")
    status: EvalStatus = Field(description="ok, missing, undecodable or failed")
    reason: str = Field("", description="why it was not scored")
    video: str = Field(description="the generated video")
    scores: ClipScores | None = Field(None, description="the clip's measures when ok")
    features: dict[str, str] = Field(
        default_factory=dict,
        description="truth_fvd, generated_fvd, truth_fid_vid, generated_fid_vid: float64 [N, D] as base64 .npy",
    )

    def result(self) -> metrics.ClipResult:
        assert self.scores is not None
        arrays = {k: np.load(io.BytesIO(base64.b64decode(v)), allow_pickle=False) for k, v in self.features.items()}
        return metrics.ClipResult(
            self.scores,
            {w: arrays[f"truth_{w}"] for w in ("fvd", "fid_vid")},
            {w: arrays[f"generated_{w}"] for w in ("fvd", "fid_vid")},
        )


def _npy64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float64), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


@lru_cache(maxsize=2)
def eval_networks(cfg: EvalNetworks, lpips_backbone: str = "alex") -> EvalNets:
    """The feature networks, loaded once per process (on the GPU when there is one)."""
    nets = load_eval_networks(cfg, Protocol(lpips_backbone=lpips_backbone))
    return nets.to("cuda") if torch.cuda.is_available() else nets


def networks_of(cfg: EvalConfig, pose: PoseConfig) -> str:
    """Every network behind the scores, as results state it."""
    return f"{eval_networks(cfg.networks, cfg.protocol.lpips_backbone).describe()}; pck: {pck_models(pose)[1]}"


def pck_models(pose: PoseConfig) -> tuple[tuple[Path, ...], str]:
    """The pose stage's real DWPose files re-detect the generated persons for PCK; the tiny random
    and the truth models cannot (no truth exists for a generated video): PCK is not measured."""
    if pose.models != "files":
        return (), f"not measured (pose models {pose.models!r})"
    from preprocess.pose.stage import models_digest

    files = pose.model_files()
    return files, f"dwpose {models_digest(files)}"


def _detect(frames: np.ndarray, pose: PoseConfig, files: tuple[Path, ...]) -> metrics.Poses:
    from preprocess.pose.stage import pack_poses, runner_for

    runner = runner_for(pose, files)  # type: ignore[arg-type]
    found = []
    for start in range(0, len(frames), pose.frames_per_chunk):
        chunk = frames[start : start + pose.frames_per_chunk]
        if pose.channel_order == "bgr":
            chunk = np.ascontiguousarray(chunk[..., ::-1])
        found += runner.estimate(chunk, pose.max_persons)[0]
    packed = pack_poses(found)
    return metrics.Poses(packed["keypoints"], packed["scores"])


def score_item(
    item: ScoreItem, protocol: Protocol, networks: EvalNetworks, pose: PoseConfig | None = None
) -> ScoredClip:
    """Score one generated video against its truth (model.metrics.score_clip). An unusable
    generated video gives a ScoredClip with its status and reason (a fact about its content); a
    truth that cannot be read raises (the workspace is damaged: not the video's fault)."""
    pose = pose or PoseConfig(models="truth")
    nets = eval_networks(networks, protocol.lpips_backbone)
    files, pck_name = pck_models(pose)
    try:
        generated, generated_fps = decode_video(item.generated)
    except VideoUnusable as exc:
        return ScoredClip(clip_id=item.clip_id, status=exc.status, reason=str(exc), video=str(item.generated))
    try:
        truth, truth_fps = decode_video(item.truth)
    except VideoUnusable as exc:
        raise ValueError(f"truth of {item.clip_id}: {exc}") from exc
    masks, poses = read_npz(item.masks), read_npz(item.poses)
    labels = masks["label_map"]
    if len(labels) != len(truth):
        raise ValueError(f"{item.masks}: {len(labels)} frames, its clip {item.truth} has {len(truth)}")
    result = metrics.score_clip(
        item.clip_id,
        truth,
        truth_fps,
        generated,
        generated_fps,
        labels,
        nets,
        protocol,
        truth_poses=metrics.Poses(poses["keypoints"], poses["scores"], masks["pose_index"]),
        generated_poses=_detect(generated, pose, files) if files else None,
        num_persons=int(masks["pose_index"].shape[1]),
    )
    scores = result.scores.model_copy(update={"networks": f"{result.scores.networks}; pck: {pck_name}"})
    features = {f"truth_{w}": _npy64(a) for w, a in result.truth_features.items()}
    features |= {f"generated_{w}": _npy64(a) for w, a in result.generated_features.items()}
    return ScoredClip(clip_id=item.clip_id, status="ok", video=str(item.generated), scores=scores, features=features)


# --------------------------------------------------------------------------------- outputs
def summarize(outcomes: Sequence[ScoredClip]) -> EvalSummary | None:
    """The aggregates over the scored clips (None when none was scored)."""
    scored = [o.result() for o in outcomes if o.status == "ok"]
    return metrics.summarize(scored) if scored else None


def rows(outcome: ScoredClip, protocol: Protocol, networks: str, tiny: bool) -> list[EvalRow]:
    """per_clip.parquet's rows of one clip: the clip (person 0), then each person."""
    s = outcome.scores
    common = dict(clip_id=outcome.clip_id, status=outcome.status, reason=outcome.reason, video=outcome.video)
    if s is None:
        empty = dict.fromkeys(
            ("num_frames", "psnr", "ssim", "lpips", "pck", "swap_rate", "swapped_with", "background_change")
            + ("background_change_truth", "seam_drift", "seam_drift_truth")
        )
        stamp = dict(protocol_version=PROTOCOL_VERSION, protocol_digest=protocol.digest(), networks=networks)
        return [EvalRow(**common, person=0, resampling="", tiny_networks=tiny, **stamp, **empty)]
    stamp = dict(
        protocol_version=s.protocol_version,
        protocol_digest=s.protocol_digest,
        networks=s.networks,
        tiny_networks=s.tiny_networks,
        resampling=s.resampling,
        num_frames=s.num_frames,
    )
    out = [
        EvalRow(
            **common,
            **stamp,
            person=0,
            psnr=s.psnr,
            ssim=s.ssim,
            lpips=s.lpips,
            pck=s.pck,
            swap_rate=s.swap_rate,
            swapped_with=None,
            background_change=s.background_change,
            background_change_truth=s.background_change_truth,
            seam_drift=s.seam_drift,
            seam_drift_truth=s.seam_drift_truth,
        )
    ]
    for p in s.persons():
        out.append(
            EvalRow(
                **common,
                **stamp,
                person=p.person,
                psnr=p.psnr,
                ssim=p.ssim,
                lpips=None,
                pck=p.pck,
                swap_rate=p.swap_rate,
                swapped_with=p.swapped_with,
                background_change=None,
                background_change_truth=None,
                seam_drift=None,
                seam_drift_truth=None,
            )
        )
    return out


def write_outputs(
    workspace: Workspace | Path,
    name: str,
    outcomes: Sequence[ScoredClip],
    protocol: Protocol,
    networks: str,
    tiny: bool,
) -> EvalSummary | None:
    """evals/<name>/per_clip.parquet (every clip, scored or not) and, when a clip was scored,
    evals/<name>/metrics.parquet (the aggregates); each written whole or not at all. A stale
    metrics.parquet is removed when nothing was scored."""
    ws = Workspace.of(workspace)
    ordered = sorted(outcomes, key=lambda o: o.clip_id)
    table = [r for o in ordered for r in rows(o, protocol, networks, tiny)]
    write_records(table, EvalRow, ws.eval_clips(name))
    summary = summarize(ordered)
    if summary is not None:
        write_records([summary], EvalSummary, ws.eval_summary(name))
    else:
        ws.eval_summary(name).unlink(missing_ok=True)
    return summary


def _error_map(truth: np.ndarray, generated: np.ndarray) -> np.ndarray:
    # |error| averaged over channels, 0..64 stretched over the colour map (small errors visible)
    err = np.abs(truth.astype(np.int16) - generated.astype(np.int16)).mean(-1)
    scaled = np.clip(err * 4.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)[..., ::-1]


def preview_row(item: ScoreItem, protocol: Protocol) -> np.ndarray:
    """truth | generated | error map of the middle compared frame, at the compared size."""
    truth, truth_fps = decode_video(item.truth)
    generated, generated_fps = decode_video(item.generated)
    t, _, g, _ = metrics.conform_pair(truth, truth_fps, generated, generated_fps, protocol)
    mid = len(t) // 2
    gap = np.zeros((t.shape[1], 4, 3), np.uint8)
    return np.concatenate([t[mid], gap, g[mid], gap, _error_map(t[mid], g[mid])], axis=1)


def write_preview(
    workspace: Workspace | Path,
    name: str,
    outcomes: Sequence[ScoredClip],
    items: dict[str, ScoreItem],
    protocol: Protocol,
) -> tuple[Path, np.ndarray, list[tuple[str, str, float]]] | None:
    """evals/<name>/preview.png: the worst clip by PSNR above the best (truth | generated | error
    map each); (path, image, [(which, clip, psnr)]). None when no clip was scored."""
    scored = [o for o in outcomes if o.scores is not None and o.scores.psnr is not None and o.clip_id in items]
    if not scored:
        return None
    ranked = sorted(scored, key=lambda o: (o.scores.psnr, o.clip_id))  # type: ignore[union-attr]
    picks = [("worst", ranked[0])] + ([("best", ranked[-1])] if len(ranked) > 1 else [])
    lines = [preview_row(items[o.clip_id], protocol) for _, o in picks]
    width = max(line.shape[1] for line in lines)
    image = np.concatenate([np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0))) for line in lines], axis=0)
    ok, png = cv2.imencode(".png", image[..., ::-1])
    assert ok
    path = atomic_write_bytes(Workspace.of(workspace).eval_preview(name), png.tobytes())
    return path, image, [(which, o.clip_id, float(o.scores.psnr)) for which, o in picks]  # type: ignore[union-attr,arg-type]


# --------------------------------------------------------------------------------- compare
COMPARED = ("psnr", "ssim", "lpips", "fvd", "fid_vid", "pck", "swap_rate", "background_change", "seam_drift")


def read_summary(workspace: Workspace | Path, name: str) -> EvalSummary:
    path = Workspace.of(workspace).eval_summary(name)
    if not path.is_file():
        raise ValueError(f"{path}: missing; no clip of evaluation {name!r} was scored (or it never ran)")
    (summary,) = read_records(path, EvalSummary)
    return summary


def compare(workspace: Workspace | Path, a: str, b: str) -> tuple[list[dict], list[str]]:
    """The aggregates of evaluations ``a`` and ``b`` side by side, with b - a; and warnings when
    they are not comparable (other protocol or networks, tiny networks)."""
    sa, sb = read_summary(workspace, a), read_summary(workspace, b)
    ka, kb = f"A: {a}", f"B: {b}"
    table: list[dict] = [{"measure": "clips", ka: sa.num_clips, kb: sb.num_clips, "B - A": sb.num_clips - sa.num_clips}]
    for measure in COMPARED:
        va, vb = getattr(sa, measure), getattr(sb, measure)
        diff = vb - va if va is not None and vb is not None else None
        table.append({"measure": measure, ka: va, kb: vb, "B - A": diff})
    notes = []
    if sa.protocol_digest != sb.protocol_digest or sa.protocol_version != sb.protocol_version:
        notes.append(
            f"NOT COMPARABLE: protocol {sa.protocol_version}/{sa.protocol_digest} vs "
            f"{sb.protocol_version}/{sb.protocol_digest}"
        )
    if sa.networks != sb.networks:
        notes.append(f"NOT COMPARABLE: networks differ: {a}: {sa.networks} | {b}: {sb.networks}")
    for name, s in dict.fromkeys(((a, sa), (b, sb))):
        if s.tiny_networks:
            notes.append(f"{name}: tiny random networks ({s.networks}): smoke-test numbers, not scores")
        else:
            notes.append(f"{name}: networks {s.networks}")
    return table, notes


# --------------------------------------------------------------------------- generation
def resolve_checkpoint(workspace: Workspace | Path, model: ModelConfig, checkpoint: str) -> ModelConfig:
    """The profile's model with ``checkpoint``'s weights: a run name under runs/ (its final/
    weights), a folder (our format or the released output_dir), or ``base`` (none)."""
    if checkpoint == BASE:
        return model.model_copy(update={"multianimate": None})
    ws = Workspace.of(workspace)
    run_final = ws.run(checkpoint) / "final"
    if "/" not in checkpoint and run_final.is_dir():
        folder = run_final
    elif Path(checkpoint).is_dir():
        folder = Path(checkpoint).absolute()
    else:
        raise ValueError(
            f"checkpoint {checkpoint!r}: neither a finished run ({run_final} missing) nor a folder; "
            f"or '{BASE}' for the base model"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"checkpoint {folder}: no *.safetensors inside")
    return model.model_copy(update={"multianimate": folder})


def generation_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) of a clip's generated video: its aspect, the shorter side ``short_side``
    (None: its own size), both rounded down to multiples of 16 (at least 16)."""
    scale = 1.0 if short_side is None else short_side / min(width, height)

    def down16(n: float) -> int:
        return max(16, int(n + 1e-6) // 16 * 16)

    return down16(width * scale), down16(height * scale)


def generation_frames(num_frames: int, max_frames: int) -> int:
    """The most frames of the form 4k+1 within the clip and ``max_frames``."""
    n = min(num_frames, max_frames)
    if n < 1:
        raise ValueError(f"a clip of {num_frames} frames cannot be generated")
    return (n - 1) // 4 * 4 + 1


def write_reference(workspace: Workspace | Path, name: str, clip_id: str) -> Path:
    """The clip's first frame as evals/<name>/references/<clip_id>.png (rewritten only when absent)."""
    ws = Workspace.of(workspace)
    path = ws.eval_reference(name, clip_id)
    if not path.is_file():
        (frame,) = media.read_frames(ws.clip_file(clip_id), [0])
        ok, png = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))
        assert ok
        atomic_write_bytes(path, png.tobytes())
    return path.absolute()


def eval_job(
    workspace: Workspace | Path, name: str, sample: ShardSample, cfg: EvalConfig, model: ModelConfig
) -> JobSpec:
    """The generation job of one held-out clip: its first frame animated by its own poses and
    label map, at its frame rate, with its caption."""
    ws = Workspace(Path(Workspace.of(workspace).root).absolute())
    width, height = generation_size(sample.width, sample.height, cfg.short_side)
    return JobSpec(
        reference=write_reference(ws, name, sample.key),
        poses=ws.pose_file(sample.key),
        masks=ws.mask_file(sample.key),
        reference_poses=ws.pose_file(sample.key),
        prompt=sample.caption,
        seed=cfg.seed,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=height,
        width=width,
        num_frames=generation_frames(sample.num_frames, cfg.max_frames),
        fps=sample.fps,
        model=model,
    )
