"""Held-out evaluation flows: score a folder of generated videos (``score``), or generate every
held-out clip with a checkpoint and score it (``evaluate``).

The held-out clips are the ``val`` split of shards/index.parquet (model.scoring.held_out_clips).

``evaluate``:
1. one JobSpec per held-out clip: its first frame (evals/<name>/references/<clip_id>.png) animated
   by its own poses and label map, at its frame rate, with its caption, the checkpoint's model;
   queued as queue/<job_id>.json like any job;
2. jobs not finished are run one at a time by the generate flow's own job runner (outputs and
   job.json published in one rename); a finished job is never run again;
3. then scoring as ``score`` does, on the jobs' videos.

``score`` (and step 3):
1. every held-out clip's video, hashed (a missing one is a row with its reason);
2. one cached task per clip (tasks.evaluate.score_clip: keyed by the contents of both videos,
   the truth's label map and poses, the protocol, the networks and the code), so a rerun scores
   only what is new;
3. evals/<name>/per_clip.parquet and metrics.parquet, written whole; evals/<name>/preview.png
   (worst and best clip by PSNR); a table and a markdown artifact. Every result names the
   networks that made it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from data_schemas import ProjectConfig
from data_schemas.atomic import remove_stale_temps
from data_schemas.job import JobRecord, JobSpec, read_record, submit_job
from data_schemas.shard import ShardSample
from data_schemas.workspace import Workspace
from flows.runtime import run_cached, workspace_lock
from model import scoring
from model.scoring import ScoredClip
from preprocess.job_inputs import check_job_inputs
from tasks.evaluate import publish_comparison, publish_evaluation, score_clip
from tasks.generate import run_job_and_publish


class EvalOutcome(BaseModel):
    """What a score or evaluate run returns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the evaluation: evals/<name>/")
    num_clips: int = Field(description="held-out clips")
    num_scored: int = Field(description="clips scored")
    not_scored: dict[str, str] = Field(default_factory=dict, description="clip -> status: reason, of the others")
    resampled: dict[str, str] = Field(default_factory=dict, description="clip -> what the conform rule did")
    generated: list[str] = Field(default_factory=list, description="evaluate: jobs run by this run")
    finished_before: list[str] = Field(default_factory=list, description="evaluate: jobs finished before (not rerun)")
    networks: str = Field(description="which networks made the scores")
    tiny_networks: bool = Field(description="some network was a tiny random one: the numbers are no scores")
    per_clip: str = Field(description="evals/<name>/per_clip.parquet")
    metrics: str | None = Field(description="evals/<name>/metrics.parquet (None: nothing scored)")
    preview: str | None = Field(description="evals/<name>/preview.png (None: nothing scored)")


def _score(
    ws: Workspace,
    name: str,
    videos: dict[str, Path],
    samples: list[ShardSample],
    config: ProjectConfig,
    failed: dict[str, str] | None = None,
) -> EvalOutcome:
    """Score each held-out clip's video (``failed``: clips with no video to score, and why)."""
    logger = get_run_logger()
    cfg = config.evaluate
    networks = scoring.networks_of(cfg, config.pose)
    tiny = cfg.networks.tiny
    if tiny:
        logger.warning("tiny random feature networks (%s): the numbers are a smoke test, not scores", networks)
    outcomes: dict[str, ScoredClip] = {}
    items = {}
    for sample in samples:
        if failed and sample.key in failed:
            outcomes[sample.key] = ScoredClip(
                clip_id=sample.key, status="failed", reason=failed[sample.key], video=str(videos[sample.key])
            )
            continue
        item = scoring.score_item_for(ws, sample, videos[sample.key])
        if item is None:
            reason = f"{videos[sample.key]}: no such video"
            outcomes[sample.key] = ScoredClip(
                clip_id=sample.key, status="missing", reason=reason, video=str(videos[sample.key])
            )
        else:
            items[sample.key] = item
    arguments = {key: (item, cfg.protocol, cfg.networks, config.pose) for key, item in items.items()}
    done = run_cached(score_clip, ws.root, arguments, lambda r: [], f"scoring {len(items)} clip(s)")
    for key, result in done.items():
        if isinstance(result, BaseException):  # a truth that cannot be read, a timeout after its retry
            result = ScoredClip(clip_id=key, status="failed", reason=str(result), video=str(items[key].generated))
        outcomes[key] = result
    listed = [outcomes[s.key] for s in samples]
    summary = scoring.write_outputs(ws, name, listed, cfg.protocol, networks, tiny)
    try:
        preview = scoring.write_preview(ws, name, listed, items, cfg.protocol)
    except (ValueError, OSError) as exc:  # the numbers stand without their picture
        logger.warning("no preview: %s", exc)
        preview = None
    publish_evaluation(name, listed, summary, networks, preview)
    return EvalOutcome(
        name=name,
        num_clips=len(listed),
        num_scored=sum(o.status == "ok" for o in listed),
        not_scored={o.clip_id: f"{o.status}: {o.reason}" for o in listed if o.status != "ok"},
        resampled={o.clip_id: o.scores.resampling for o in listed if o.scores and o.scores.resampling},
        networks=networks,
        tiny_networks=tiny,
        per_clip=str(ws.eval_clips(name)),
        metrics=str(ws.eval_summary(name)) if summary is not None else None,
        preview=str(preview[0]) if preview is not None else None,
    )


@flow(name="score", flow_run_name="score {name}")
def score(workspace: Path, videos: Path, name: str, config: ProjectConfig = ProjectConfig()) -> EvalOutcome:
    """Score ``videos``/<clip_id>.mp4 against every held-out clip of the workspace into
    evals/<name>/ (``config.evaluate``: protocol and networks; ``config.pose``: PCK's models)."""
    scoring.check_name(name)
    with workspace_lock(workspace):
        ws = Workspace(Path(workspace).absolute())
        samples = scoring.held_out_clips(ws)
        found = {s.key: Path(videos).absolute() / f"{s.key}.mp4" for s in samples}
        others = sorted(p.name for p in Path(videos).glob("*.mp4") if p.stem not in found)
        if others:
            get_run_logger().warning("not held-out clips, ignored: %s", ", ".join(others[:10]))
        return _score(ws, name, found, samples, config)


def _generate(ws: Workspace, jobs: dict[str, JobSpec], config: ProjectConfig) -> tuple[dict, list[str], list[str]]:
    """Run the jobs not finished; (clip -> record, jobs run, jobs finished before)."""
    logger = get_run_logger()
    records: dict[str, JobRecord] = {}
    run, before = [], []
    for clip_id, spec in jobs.items():
        job_id, _ = submit_job(ws.root, spec)  # the queue keeps the history, as for any job
        record = read_record(ws.root, job_id)
        if record is not None and record.status == "ok":
            records[clip_id] = record
            before.append(job_id)
            continue
        try:
            check_job_inputs(spec, config.ingest, config.generate, decode=False)
            inputs: tuple[Path, Path] | BaseException = (spec.poses, spec.masks)  # type: ignore[assignment]
        except ValueError as exc:
            inputs = exc
        record = run_job_and_publish(ws.root, job_id, spec, inputs, config, (), 0.0)
        if record.status == "failed":
            logger.error("%s: job %s failed (%s): %s", clip_id, job_id, record.reason, record.error)
        records[clip_id] = record
        run.append(job_id)
    return records, run, before


@flow(name="evaluate", flow_run_name="evaluate {checkpoint}")
def evaluate(
    workspace: Path,
    checkpoint: str = scoring.BASE,
    name: str | None = None,
    config: ProjectConfig = ProjectConfig(),
) -> EvalOutcome:
    """Generate every held-out clip with ``checkpoint`` (a run name under runs/, a folder, or
    ``base``) from its first frame, poses and label map, and score it into evals/<name>/
    (default name: the checkpoint's). ``config``: the model profile, ``evaluate`` (protocol,
    networks, steps, size), the generation limits."""
    name = scoring.check_name(name or Path(checkpoint).name)
    with workspace_lock(workspace):
        ws = Workspace(Path(workspace).absolute())
        for folder in (ws.queue, ws.outputs, ws.eval(name)):
            for stale in remove_stale_temps(folder):
                get_run_logger().info("removed %s, left by an interrupted run", stale)
        samples = scoring.held_out_clips(ws)
        model = scoring.resolve_checkpoint(ws, config.model, checkpoint)
        jobs = {s.key: scoring.eval_job(ws, name, s, config.evaluate, model) for s in samples}
        records, run, before = _generate(ws, jobs, config)
        get_run_logger().info("%d job(s) generated, %d finished before", len(run), len(before))
        videos = {clip: ws.output(r.job_id) / "video.mp4" for clip, r in records.items()}
        failed = {clip: f"generation failed ({r.reason}): {r.error}" for clip, r in records.items() if r.status != "ok"}
        outcome = _score(ws, name, videos, samples, config, failed)
        return outcome.model_copy(update={"generated": run, "finished_before": before})


@flow(name="compare-evaluations", flow_run_name="compare {a} {b}")
def compare(workspace: Path, a: str, b: str) -> tuple[list[dict], list[str]]:
    """The aggregates of evaluations ``a`` and ``b`` (evals/<name>/metrics.parquet) side by side
    with b - a, as a table artifact; and why they are not comparable, when they are not."""
    table, notes = scoring.compare(Workspace(Path(workspace).absolute()), a, b)
    for note in notes:
        get_run_logger().warning(note)
    publish_comparison(a, b, table, notes)
    return table, notes
