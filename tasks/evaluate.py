"""Prefect tasks of held-out evaluation: one clip's scores (cached by content), and the
evaluation's artifacts (a table of the clips, the worst and best clips' previews)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

import data_schemas.evaluation
from data_schemas.config import PoseConfig
from data_schemas.evaluation import EvalNetworks, EvalSummary, Protocol
from model import feature_nets, metrics, scoring
from model.scoring import ScoredClip, ScoreItem
from tasks.common import GPU_TAG, code_version, retry_transient
from tasks.reports import inline_image

SCORE_CODE = code_version(scoring, metrics, feature_nets, data_schemas.evaluation)
PREVIEW_WIDTH = 1024


def _score_cache_key(context: TaskRunContext | None, parameters: dict) -> str:
    # Contents, not paths: the two videos, the truth's label map and poses, the protocol, the
    # networks (their files' hashes, in describe()), the pose models of PCK, our code.
    item: ScoreItem = parameters["item"]
    protocol: Protocol = parameters["protocol"]
    networks = scoring.eval_networks(parameters["networks"], protocol.lpips_backbone).describe()
    pck = scoring.pck_models(parameters["pose"])[1]
    contents = f"{item.truth_sha256}-{item.masks_sha256}-{item.poses_sha256}-{networks}-{pck}"
    return f"score-{item.generated_sha256}-{hashlib.sha256(contents.encode()).hexdigest()[:16]}-" + (
        f"{protocol.digest()}-{SCORE_CODE}"
    )


@task(
    name="score",
    task_run_name="score {item.clip_id}",
    tags=[GPU_TAG],
    cache_key_fn=_score_cache_key,
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def score_clip(item: ScoreItem, protocol: Protocol, networks: EvalNetworks, pose: PoseConfig) -> ScoredClip:
    """One generated video against its held-out truth (see model.scoring.score_item)."""
    outcome = scoring.score_item(item, protocol, networks, pose)
    s = outcome.scores
    if s is None:
        get_run_logger().warning("%s: %s (%s)", item.clip_id, outcome.status, outcome.reason)
    else:
        get_run_logger().info("%s: psnr %.2f, ssim %.3f over %d frames", item.clip_id, s.psnr, s.ssim, s.num_frames)
    return outcome


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def publish_evaluation(
    name: str,
    outcomes: list[ScoredClip],
    summary: EvalSummary | None,
    networks: str,
    preview: tuple[Path, object, list[tuple[str, str, float]]] | None,
) -> None:
    """A table of every clip (with the networks that made the numbers) and a markdown artifact
    with the aggregates and the worst and best clips' previews (truth | generated | error map)."""
    key = f"evaluation-{name}".lower().replace("_", "-").replace(".", "-")
    table = [
        {
            "clip": o.clip_id,
            "status": o.status,
            "psnr": _round(o.scores.psnr if o.scores else None, 2),
            "ssim": _round(o.scores.ssim if o.scores else None),
            "lpips": _round(o.scores.lpips if o.scores else None),
            "pck": _round(o.scores.pck if o.scores else None),
            "swap_rate": _round(o.scores.swap_rate if o.scores else None),
            "reason": o.reason or (o.scores.resampling if o.scores else ""),
        }
        for o in sorted(outcomes, key=lambda o: o.clip_id)
    ]
    create_table_artifact(key=key, table=table, description=f"Evaluation {name}: per clip; networks: {networks}")
    lines = [f"### Evaluation `{name}`", "", f"Networks: {networks}", ""]
    if summary is None:
        lines.append("No clip was scored: see the table's reasons.")
    else:
        if summary.tiny_networks:
            lines += ["**Tiny random networks: these numbers are a smoke test, not scores.**", ""]
        lines += ["| measure | value |", "| --- | --- |"]
        for measure in ("num_clips", *scoring.COMPARED):
            lines.append(f"| {measure} | {getattr(summary, measure)} |")
    if preview is not None:
        path, image, picks = preview
        lines += ["", f"Preview (truth | generated | error map): `{path}`", ""]
        lines += [f"- {which}: `{clip}` (PSNR {psnr:.2f} dB)" for which, clip, psnr in picks]
        lines += ["", inline_image(image, "preview", max_width=PREVIEW_WIDTH)]  # type: ignore[arg-type]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines), description=f"Evaluation {name}")


def publish_comparison(a: str, b: str, table: list[dict], notes: list[str]) -> None:
    key = f"compare-{a}-{b}".lower().replace("_", "-").replace(".", "-")
    description = f"Evaluations {a} vs {b} ({b} - {a})" + (": " + "; ".join(notes) if notes else "")
    create_table_artifact(key=key, table=table, description=description)
