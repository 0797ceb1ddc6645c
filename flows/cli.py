"""The ``multianimate`` command line: one verb per flow.

Prefect is imported only inside the commands, after ``use_workspace`` has pointed its
home at the workspace (and taken the workspace lock: one verb that writes at a time).

Every verb ends, on failure, with one line naming the cause (``error: ...``, the last line
of stderr) and exits with: 0 done, 1 failed or nothing succeeded, 2 bad arguments,
75 the workspace is in use by another run, 130 interrupted.
"""

from __future__ import annotations

import atexit
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from data_schemas.workspace import Workspace
from flows.runtime import WorkspaceBusy, failure_cause, use_workspace

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="MultiAnimate: raw videos -> training data -> model -> videos."
)
console = Console()

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="folder that holds every product")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="profile YAML (default: built-in defaults)")]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="when another run holds the workspace, wait for it to end instead of refusing")
]
DaskOpt = Annotated[
    str | None, typer.Option("--dask-address", help="run tasks on a Dask cluster, e.g. tcp://127.0.0.1:8786")
]
GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", min=1, help="start a local Dask cluster of one worker per GPU (the first N GPUs)"),
]

EXIT_FAILED, EXIT_BUSY, EXIT_INTERRUPTED = 1, 75, 130
# click's base of usage errors (typer raises them from its own copy of click in recent versions)
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class NothingDone(Exception):
    """The verb ran, but nothing it was asked for succeeded: the message says why."""


def _check_weights(
    cfg, stages: tuple[str, ...] = ("pose", "segment"), strict: bool = True
) -> list[tuple[str, bool, str]]:
    """The real weight files the profile ``cfg`` names for ``stages`` (of pose, segment, model):
    per stage, (stage, whether it uses real files, what is missing or ""). ``strict``: the first
    stage with missing files raises its ValueError instead (the message says how to get them)."""
    checks = {
        "pose": (cfg.pose.models == "files", cfg.pose.model_files),
        "segment": (cfg.segment.models == "files", cfg.segment.model_folder),
        "model": (cfg.model.profile != "tiny", cfg.model.require_weights),
    }
    found = []
    for stage in stages:
        uses_files, check = checks[stage]
        problem = ""
        if uses_files:
            try:
                check()
            except ValueError as exc:
                if strict:
                    raise
                problem = str(exc)
        found.append((stage, uses_files, problem))
    return found


def _checked_config(folder: Path, config: Path | None, weights: bool = True):
    """The profile, checked before anything is created: the input folder, the values, the
    weight files it names (one clear message for whatever is missing)."""
    from data_schemas import load_config

    if not folder.is_dir():
        raise typer.BadParameter(f"{folder}: not a folder", param_hint="FOLDER")
    try:
        cfg = load_config(config)
        if weights:
            _check_weights(cfg)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return cfg


def _print_summary(summary) -> None:
    table = Table(title="ingest")
    for column in ("files", "ok", "failed", "duplicates", "clips"):
        table.add_column(column, justify="right")
    table.add_row(
        *(
            str(v)
            for v in (summary.num_files, summary.num_ok, summary.num_failed, summary.num_duplicates, summary.num_clips)
        )
    )
    console.print(table)
    console.print(f"videos manifest: {summary.videos_manifest}\nclips manifest:  {summary.clips_manifest}")


@app.command()
def ingest(
    folder: Annotated[Path, typer.Argument(help="folder of raw videos, walked recursively")],
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    dask_address: DaskOpt = None,
    workers: Annotated[int | None, typer.Option(help="local worker threads (default: CPU count)")] = None,
    wait: WaitOpt = False,
) -> None:
    """Validate, deduplicate and cut a folder of raw videos into normalised clips."""
    cfg = _checked_config(folder, config, weights=False)
    workspace = use_workspace(workspace, wait)
    from flows.ingest import ingest as ingest_flow
    from flows.runtime import make_task_runner

    try:
        runner = make_task_runner(dask_address, workers)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = ingest_flow.with_options(task_runner=runner)(folder, workspace, cfg.ingest)
    _print_summary(summary)
    console.print(
        f"the workspace lists {summary.num_sources} file(s) of every folder ingested into it, {summary.num_clips} clip(s)"
    )
    _require_usable_input(workspace, folder, summary.num_files, summary.num_failed)
    if summary.num_passing:
        # Not a verdict on the files: nothing was cached for them, so the same command retries them.
        raise NothingDone(
            f"{summary.num_passing} file(s) under {folder} not processed for a passing reason (timeout or I/O "
            f"error, in the log above); run the same command again to process them"
        )


def _require_usable_input(
    workspace: Path, folder: Path, num_files: int | None = None, num_failed: int | None = None
) -> None:
    """NothingDone, with the count of each failure reason and an example, when the folder held
    no file that ingest could use (the counts default to the manifest's rows of the folder)."""
    from data_schemas import VideoRecord, read_records
    from data_schemas.video import VideoStatus

    folder = folder.absolute()
    manifest = Workspace(workspace).videos_manifest
    rows = (
        [r for r in read_records(manifest, VideoRecord) if Path(r.path).is_relative_to(folder)]
        if manifest.is_file()
        else []
    )
    failed = [r for r in rows if r.status == VideoStatus.failed]
    num_files, num_failed = (
        len(rows) if num_files is None else num_files,
        len(failed) if num_failed is None else num_failed,
    )
    if num_files == 0:
        raise NothingDone(f"no video file under {folder} (see ingest.extensions of the profile)")
    if num_failed < num_files:
        return
    reasons = ", ".join(
        f"{n} {reason}" for reason, n in sorted(Counter(r.reason.value if r.reason else "?" for r in failed).items())
    )
    example = f"; e.g. {failed[0].error}" if failed and failed[0].error else ""
    raise NothingDone(
        f"all {num_files} input file(s) under {folder} failed ({reasons or 'see the manifest'}){example}; "
        f"every file's reason: {manifest}"
    )


def _print_preprocess(summary) -> None:
    console.print(f"poses of {summary.num_posed}/{summary.num_clips} clip(s): {summary.poses_manifest}")
    console.print(f"masks of {summary.num_segmented}/{summary.num_clips} clip(s): {summary.masks_manifest}")
    console.print(f"{summary.num_samples} training sample(s) in shards: {summary.shards_index}")
    if summary.num_left_out:
        console.print(f"{summary.num_left_out} clip(s) left out by the quality filters: {summary.left_out}")
    if summary.failed_clips:
        console.print(f"[red]failed clips: {', '.join(summary.failed_clips)}[/red]")
    for name, path in (
        ("contact sheet", summary.contact_sheet),
        ("mask overlays", summary.mask_overlays),
        ("data card", summary.data_card),
    ):
        if path:
            console.print(f"{name}: {path}")


@app.command()
def preprocess(
    folder: Annotated[Path, typer.Argument(help="folder of raw videos, walked recursively")],
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    workers: Annotated[int | None, typer.Option(help="local worker threads (default: CPU count)")] = None,
    wait: WaitOpt = False,
    dask_address: DaskOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """Ingest a folder of raw videos, extract poses of every clip, then track every person
    (on a Dask cluster's GPU workers with --dask-address, on this node's GPUs with --gpus)."""
    cfg = _checked_config(folder, config)
    workspace = use_workspace(workspace, wait)
    from flows.preprocess import preprocess as preprocess_flow
    from flows.runtime import make_task_runner

    try:  # a cluster without GPU workers is refused here, before the flow starts
        runner = make_task_runner(dask_address, workers, gpus, stages=("preprocess",))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = preprocess_flow.with_options(task_runner=runner)(folder, workspace, cfg)
    _print_preprocess(summary)
    _require_usable_input(workspace, folder)
    if summary.num_samples == 0:
        raise NothingDone(
            f"no training sample: {summary.num_clips} clip(s), poses of {summary.num_posed}, masks of "
            f"{summary.num_segmented}; the failed tasks' errors are in the log above"
        )


@app.command("import-legacy")
def import_legacy(
    root: Annotated[Path, typer.Argument(help="folder holding processed_data/<video>/ pickles and/or demo folders")],
    workspace: WorkspaceOpt = Path("workspace"),
    trust_pickles: Annotated[
        bool,
        typer.Option(
            "--trust-pickles",
            help="unpickle the seed's .pkl files: they can run code, so only for data from a source you trust",
        ),
    ] = False,
    fps: Annotated[float, typer.Option(help="frame rate of the imported clips")] = 25.0,
    wait: WaitOpt = False,
) -> None:
    """Import the seed's training pickles and demo folders as clips, pose images and label maps."""
    if not root.is_dir():
        raise typer.BadParameter(f"{root}: not a folder", param_hint="ROOT")
    workspace = use_workspace(workspace, wait)
    from flows.legacy import import_legacy as import_flow

    clips = import_flow(root, workspace, trust_pickles=trust_pickles, fps=fps)
    console.print(f"imported {len(clips)} clip(s) into {workspace} ({Workspace(workspace).manifest('legacy')})")
    if not clips:
        raise NothingDone(f"nothing imported from {root}: each folder's reason is in the log above")


@app.command()
def demo(
    workspace: WorkspaceOpt = Path("workspace"),
    num_videos: Annotated[int, typer.Option(help="synthetic sample videos to generate")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the sample videos")] = 0,
    train_steps: Annotated[int, typer.Option(help="optimizer steps of the demo's training run")] = 4,
    nproc: Annotated[int, typer.Option(help="torchrun processes of the demo's training run")] = 2,
    models: Annotated[
        str,
        typer.Option(
            help="pose and segment models: 'truth' (the generator's exact poses and masks) "
            "or 'tiny' (random-weight DWPose and SAM2: the real code, meaningless labels)"
        ),
    ] = "truth",
    wait: WaitOpt = False,
) -> None:
    """The whole pipeline on generated sample videos with tiny models on the CPU."""
    if models not in ("truth", "tiny"):
        raise typer.BadParameter(f"{models!r}: choose 'truth' or 'tiny'", param_hint="--models")
    workspace = use_workspace(workspace, wait)
    from flows.demo import demo as demo_flow

    summary = demo_flow(
        workspace, num_videos=num_videos, seed=seed, train_steps=train_steps, nproc=nproc, models=models
    )
    _print_preprocess(summary.preprocess)
    job = Workspace(workspace).output(summary.job_id)
    table = Table(title="where everything is")
    table.add_column("what")
    table.add_column("path")
    for what, path in (
        ("workspace", workspace),
        ("shards", summary.preprocess.shards_index),
        ("embeddings", summary.embeddings.index),
        ("training run", summary.training.run_dir),
        ("trained weights", summary.training.final_weights),
        ("loss curve", summary.training.loss_curve),
        ("generated video", job / "video.mp4"),
        ("preview (reference | pose | result)", job / "preview.mp4"),
    ):
        table.add_row(what, str(path))
    console.print(table)
    if summary.generation.failed:
        console.print(f"[red]generation failed:[/red] see {job / 'job.json'}")
        raise typer.Exit(1)


def _train_default(name: str, section: str = "") -> str:
    """A TrainConfig field's (``section``: of its loader) description and default, for help
    texts: the config owns both, the option only overrides what it is given."""
    from data_schemas.train import LoaderConfig, TrainConfig

    field = (LoaderConfig if section == "loader" else TrainConfig).model_fields[name]
    return f"{field.description}; default {field.default}"


def _job_default(name: str) -> str:
    """A JobSpec field's description and default, for help texts (the schema owns both)."""
    from data_schemas.job import JobSpec

    field = JobSpec.model_fields[name]
    return field.description if field.default is None else f"{field.description}; default {field.default}"


def _person_map(text: str | None) -> dict[int, int] | None:
    if text is None:
        return None
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {int(k): int(v) for k, v in pairs}
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r}: expected DRIVING=REFERENCE pairs such as 1=2,2=1", param_hint="--person-map"
        ) from exc


@app.command()
def submit(
    reference: Annotated[Path, typer.Argument(help="reference image: the persons to animate")],
    video: Annotated[Path | None, typer.Option("--video", help="driving video")] = None,
    poses: Annotated[
        Path | None, typer.Option(help="instead of --video: a poses npz as the pose stage writes it")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option(help="with --poses: the segment stage's masks npz of the same clip")
    ] = None,
    reference_poses: Annotated[Path | None, typer.Option(help=_job_default("reference_poses"))] = None,
    person_map: Annotated[
        str | None,
        typer.Option(
            help="driving person = reference person pairs, e.g. 1=2,2=1 "
            "(persons numbered from 1; default: left to right)"
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help=_job_default("prompt"))] = None,
    seed: Annotated[int | None, typer.Option(help=_job_default("seed"))] = None,
    steps: Annotated[int | None, typer.Option(help=_job_default("steps"))] = None,
    guidance_scale: Annotated[float | None, typer.Option(help=_job_default("guidance_scale"))] = None,
    height: Annotated[int | None, typer.Option(help=_job_default("height"))] = None,
    width: Annotated[int | None, typer.Option(help=_job_default("width"))] = None,
    num_frames: Annotated[int | None, typer.Option(help=_job_default("num_frames"))] = None,
    fps: Annotated[float | None, typer.Option(help=_job_default("fps"))] = None,
    workspace: WorkspaceOpt = Path("workspace"),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="profile YAML whose model section the job uses")
    ] = None,
) -> None:
    """Queue one generation job (queue/<job_id>.json) and print its id; the same job twice is queued once.

    Every value is checked against its bounds and every input file is read as the job will
    read it (the reference decoded, a driving video probed and decoded, npz files loaded):
    a refused job is not queued and the command exits non-zero, naming the field and why."""
    import os

    from pydantic import ValidationError

    from data_schemas import load_config
    from data_schemas.job import JobSpec, describe_validation_error, queue_path, submit_job
    from preprocess.job_inputs import JobInputError, check_job_inputs

    given = dict(
        prompt=prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        num_frames=num_frames,
        fps=fps,
        person_map=_person_map(person_map),
    )
    # Absolute paths: the job runs later, from another directory or on another worker.
    files = (
        ("reference", reference),
        ("driving_video", video),
        ("poses", poses),
        ("masks", masks),
        ("reference_poses", reference_poses),
    )
    paths = {name: Path(os.path.abspath(p)) for name, p in files if p}
    try:
        cfg = load_config(config)
        model = cfg.model.model_copy(
            update={
                k: Path(os.path.abspath(v))
                for k in ("wan_folder", "multianimate", "tiny_transformer")
                if (v := getattr(cfg.model, k)) is not None
            }
        )
        spec = JobSpec(**paths, **{k: v for k, v in given.items() if v is not None}, model=model)
    except ValidationError as exc:
        raise typer.BadParameter(describe_validation_error(exc)) from exc
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        check_job_inputs(spec, cfg.ingest, cfg.generate)
    except JobInputError as exc:
        options = {"reference": "REFERENCE", "driving_video": "--video", "reference_poses": "--reference-poses"}
        hint = ", ".join(
            options.get(field, "--poses/--masks" if "/" in field else f"--{field}") for field in exc.problems
        )
        raise typer.BadParameter(str(exc), param_hint=hint) from exc
    job_id, new = submit_job(Path(workspace).absolute(), spec)
    Console(stderr=True).print(
        f"{'queued' if new else 'already queued'}: {queue_path(Path(workspace).absolute(), job_id)}"
    )
    typer.echo(job_id)


@app.command()
def generate(
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    retry_failed: Annotated[bool, typer.Option(help="run jobs that failed before again")] = True,
    job_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="seconds a job may run before it is stopped and recorded "
            "as failed (timeout); default: the profile's generate.job_timeout_s",
        ),
    ] = None,
    dask_address: DaskOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """Generate every queued job that is not finished yet (outputs/<job_id>/): one at a time, or
    one per GPU worker at once on a Dask cluster (--dask-address) or on this node's GPUs (--gpus)."""
    from data_schemas import load_config

    try:
        cfg = load_config(config)
        if job_timeout is not None:
            cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"job_timeout_s": job_timeout})})
        _check_weights(cfg)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    workspace = use_workspace(workspace)
    from rich.markup import escape

    from data_schemas.job import read_record
    from flows.generate import generate as generate_flow

    summary = _on_cluster(generate_flow, dask_address, gpus, "generate")(workspace, cfg, retry_failed=retry_failed)
    table = Table(title="generate")
    for column in ("queued", "finished before", "ok", "failed", "done by another run"):
        table.add_column(column, justify="right")
    counts = (summary.num_queued, len(summary.skipped), len(summary.ok), len(summary.failed), len(summary.elsewhere))
    table.add_row(*(str(v) for v in counts))
    console.print(table)
    console.print(f"outputs: {summary.outputs_dir}")
    for job_id in summary.failed:
        record = read_record(workspace, job_id)
        console.print(
            f"[red]{job_id} failed ({record.reason if record else '?'}):[/red] {escape(record.error or '') if record else '?'}",
            highlight=False,
        )
    if summary.failed:
        raise typer.Exit(1)


def _eval_config(config: Path | None, stages: tuple[str, ...]):
    """The profile, with the weight files it names for ``stages`` and the evaluation's feature
    networks checked before anything starts (one message for whatever is missing)."""
    from data_schemas import load_config
    from model.scoring import eval_networks

    try:
        cfg = load_config(config)
        _check_weights(cfg, stages)
        eval_networks(cfg.evaluate.networks, cfg.evaluate.protocol.lpips_backbone)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return cfg


def _eval_name(name: str) -> str:
    from model.scoring import check_name

    try:
        return check_name(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--name") from exc


def _print_evaluation(workspace: Path, outcome) -> None:
    """The aggregates, which networks made them, what was not scored or was resampled, where
    the files are; NothingDone when no clip was scored."""
    from rich.markup import escape

    from model.scoring import COMPARED, read_summary

    if outcome.metrics is not None:
        summary = read_summary(workspace, outcome.name)
        table = Table(title=f"evaluation {outcome.name}: {outcome.num_scored}/{outcome.num_clips} clip(s) scored")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for measure in COMPARED:
            value = getattr(summary, measure)
            table.add_row(measure, "-" if value is None else f"{value:.4f}")
        console.print(table)
    console.print(f"networks: {outcome.networks}", markup=False, highlight=False)
    if outcome.tiny_networks:
        console.print(
            "[yellow]tiny random feature networks: these numbers are a smoke test, not scores "
            "(evaluate.networks of the profile names the real files)[/yellow]"
        )
    for clip, how in outcome.resampled.items():
        console.print(f"{clip}: resampled: {escape(how)}", highlight=False)
    for clip, why in outcome.not_scored.items():
        console.print(f"[red]{clip}: not scored:[/red] {escape(why)}", highlight=False)
    console.print(f"per clip: {outcome.per_clip}\nmetrics:  {outcome.metrics}\npreview:  {outcome.preview}")
    if outcome.num_scored == 0:
        raise NothingDone(f"none of the {outcome.num_clips} held-out clip(s) was scored; reasons: {outcome.per_clip}")


@app.command()
def score(
    video_dir: Annotated[Path, typer.Argument(help="folder of generated videos named <clip_id>.mp4")],
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    name: Annotated[
        str | None, typer.Option(help="the evaluation's folder under evals/ (default: VIDEO_DIR's name)")
    ] = None,
    wait: WaitOpt = False,
) -> None:
    """Score generated videos against the workspace's held-out clips (the val split) into evals/<name>/."""
    if not video_dir.is_dir():
        raise typer.BadParameter(f"{video_dir}: not a folder", param_hint="VIDEO_DIR")
    name = _eval_name(name or video_dir.absolute().name)
    cfg = _eval_config(config, ("pose",))
    workspace = use_workspace(workspace, wait)
    from flows.evaluate import score as score_flow

    _print_evaluation(workspace, score_flow(workspace, video_dir.absolute(), name, cfg))


@app.command()
def evaluate(
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(help="a training run's name (runs/<run>/final), a weights folder, or 'base' (no fine-tuning)"),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="the evaluation's folder under evals/ (default: the checkpoint's name)")
    ] = None,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(metavar="A B", help="instead: the aggregates of evaluations A and B side by side, with B - A"),
    ] = None,
    wait: WaitOpt = False,
) -> None:
    """Generate every held-out clip (the val split) with a checkpoint and score it into evals/<name>/."""
    if (checkpoint is None) == (compare is None):
        raise typer.BadParameter("give --checkpoint (to evaluate) or --compare A B", param_hint="--checkpoint")
    if compare is not None:
        for one in compare:
            _eval_name(one)
        workspace = use_workspace(workspace, wait)
        from flows.evaluate import compare as compare_flow

        rows, notes = compare_flow(workspace, *compare)
        table = Table(title=f"{compare[0]} vs {compare[1]}")
        for column in rows[0]:
            table.add_column(column, justify="left" if column == "measure" else "right")
        for row in rows:
            table.add_row(*("-" if v is None else v if isinstance(v, str) else f"{v:.4g}" for v in row.values()))
        console.print(table)
        for note in notes:
            console.print(f"[yellow]{note}[/yellow]", highlight=False)
        return
    assert checkpoint is not None
    name = _eval_name(name or Path(checkpoint).name)
    cfg = _eval_config(config, ("pose", "model"))
    from model.scoring import resolve_checkpoint

    try:
        resolve_checkpoint(Workspace(Path(workspace).absolute()), cfg.model, checkpoint)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--checkpoint") from exc
    workspace = use_workspace(workspace, wait)
    from flows.evaluate import evaluate as evaluate_flow

    outcome = evaluate_flow(workspace, checkpoint, name, cfg)
    console.print(f"jobs: {len(outcome.generated)} generated, {len(outcome.finished_before)} finished before")
    _print_evaluation(workspace, outcome)


def _on_cluster(flow, dask_address: str | None, gpus: int | None, stage: str):
    """The flow on the Dask cluster (--dask-address) or the local GPU workers (--gpus) its
    GPU tasks (those of ``stage``, a ``flows.dask_worker`` stage) need; unchanged without
    them. Bad options are refused before it starts."""
    if not (dask_address or gpus):
        return flow
    from flows.runtime import make_task_runner

    try:
        return flow.with_options(task_runner=make_task_runner(dask_address=dask_address, gpus=gpus, stages=(stage,)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
def embed(
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    wait: WaitOpt = False,
    dask_address: DaskOpt = None,
    gpus: GpusOpt = None,
) -> None:
    """Cache the text embeddings of every caption of the shards (and of the negative prompt),
    on a GPU worker with --dask-address or --gpus."""
    from data_schemas import load_config

    try:
        model = load_config(config).model
        model.require_weights()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    workspace = use_workspace(workspace, wait)
    from flows.embed import embed as embed_flow

    summary = _on_cluster(embed_flow, dask_address, gpus, "embed")(workspace, model.profile, model.wan_folder)
    console.print(
        f"{summary.num_texts} text(s) for encoder {summary.encoder_id}: {summary.num_new} new, {summary.num_existing} cached"
    )


@app.command()
def train(
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    run_name: Annotated[str | None, typer.Option(help=_train_default("run_name"))] = None,
    steps: Annotated[int | None, typer.Option(help=_train_default("max_steps"))] = None,
    nproc: Annotated[int | None, typer.Option(help=_train_default("nproc"))] = None,
    num_frames: Annotated[int | None, typer.Option(help=_train_default("num_frames", "loader"))] = None,
    height: Annotated[int | None, typer.Option(help=_train_default("height", "loader"))] = None,
    width: Annotated[int | None, typer.Option(help=_train_default("width", "loader"))] = None,
    lr: Annotated[float | None, typer.Option(help=_train_default("lr"))] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help=_train_default("checkpoint_every"))] = None,
    train_config: Annotated[
        Path | None, typer.Option(help="a full TrainConfig as JSON/YAML (overrides the options above)")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="build the profile's model as training would (no shards or "
            "embeddings needed), describe its parameters and persons, do not train",
        ),
    ] = False,
    wait: WaitOpt = False,
) -> None:
    """LoRA fine-tuning on the workspace's shards under torchrun (resumes a killed run)."""
    import yaml
    from pydantic import ValidationError

    from data_schemas import load_config
    from data_schemas.train import TrainConfig

    try:
        if train_config is not None:
            cfg = TrainConfig.model_validate(yaml.safe_load(train_config.read_text()))
        else:  # only the options given override the config's defaults
            given = {
                "run_name": run_name,
                "max_steps": steps,
                "nproc": nproc,
                "lr": lr,
                "checkpoint_every": checkpoint_every,
            }
            loader = {"num_frames": num_frames, "height": height, "width": width}
            cfg = TrainConfig(
                workspace=workspace,
                model=load_config(config).model,
                **{k: v for k, v in given.items() if v is not None},
                loader={k: v for k, v in loader.items() if v is not None},
            )
    except (ValidationError, ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if dry_run:
        from model.train import train as build_and_describe

        try:
            build_and_describe(cfg, dry_run=True)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        return
    # the run folder has its own lock (model/run_folder.py): training does not hold the workspace for days
    use_workspace(cfg.workspace, wait, lock=False)
    from flows.train import train as train_flow

    result = train_flow(cfg)
    console.print(f"{result.steps} steps, final loss {result.final_loss:.4f}; weights: {result.final_weights}")


@app.command()
def deploy(
    gpu_slots: Annotated[
        int, typer.Option(min=1, help="GPU tasks that may run at once (the gpu tag's concurrency limit)")
    ] = 1,
) -> None:
    """Set up the Prefect server at PREFECT_API_URL (work pools cpu and gpu, the gpu limit) and deploy prefect.yaml."""
    from flows.deploy import deploy as deploy_all

    try:
        for line in deploy_all(gpu_slots):
            console.print(line)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
def weights(
    config: ConfigOpt = None,
    random_real_architecture: Annotated[
        Path | None,
        typer.Option(
            "--random-real-architecture",
            metavar="FOLDER",
            help="instead of checking: write Wan2.1-I2V-14B-720P (diffusers layout) and a MultiAnimate checkpoint "
            "with the REAL configs and RANDOM weights (depth cut) into FOLDER, plus FOLDER/profile.yaml, for CI",
        ),
    ] = None,
    num_layers: Annotated[
        int | None,
        typer.Option(min=1, max=40, help="with --random-real-architecture: transformer blocks (real: 40) [default: 2]"),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="with --random-real-architecture: seed of the weights [default: 0]")
    ] = None,
) -> None:
    """Check that every real weight file the profile names is present; say how to get the rest.

    With --random-real-architecture FOLDER: write random weights in the real layout instead."""
    if random_real_architecture is not None:
        import time

        from model.real_architecture import part_sizes, read_marker, write_random_real_architecture

        if config is not None:
            console.print("[yellow]warning: --config has no effect with --random-real-architecture[/yellow]")
        folder, start = random_real_architecture, time.monotonic()
        complete = read_marker(folder) is not None
        try:
            profile = write_random_real_architecture(
                folder,
                num_layers=2 if num_layers is None else num_layers,
                seed=seed or 0,
                progress=lambda message: console.print(message, markup=False, highlight=False),
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--random-real-architecture") from exc
        if not complete:
            table = Table(title=f"random weights, real architecture ({time.monotonic() - start:.0f} s)")
            table.add_column("part")
            table.add_column("size", justify="right")
            sizes = part_sizes(folder)
            for part, size in [*sizes.items(), ("total", sum(sizes.values()))]:
                table.add_row(part, f"{size / 1e6:,.1f} MB")
            console.print(table)
        console.print(f"profile: {profile}", markup=False, highlight=False)
        return
    for name, value in (("--num-layers", num_layers), ("--seed", seed)):
        if value is not None:
            console.print(f"[yellow]warning: {name} has no effect without --random-real-architecture[/yellow]")
    from data_schemas import load_config

    try:
        cfg = load_config(config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    checks = [
        (stage, "real weights" if uses_files else "tiny random-weight models (built in code)", problem)
        for stage, uses_files, problem in _check_weights(cfg, ("pose", "segment", "model"), strict=False)
    ]
    table = Table(title="weights")
    for column in ("stage", "uses", "status"):
        table.add_column(column)
    for stage, what, problem in checks:
        table.add_row(stage, what, "[red]missing[/red]" if problem else "[green]ok[/green]")
    console.print(table)
    problems = [p for _, _, p in checks if p]
    for problem in problems:
        console.print(problem, markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def remove(
    paths: Annotated[
        list[Path], typer.Argument(help="files or folders as ingest listed them (everything under a folder)")
    ],
    workspace: WorkspaceOpt = Path("workspace"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be removed, remove nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    wait: WaitOpt = False,
) -> None:
    """Take ingested files out of the workspace: their rows in the videos manifest, and the
    clips (with their poses and masks) of content no other listed file holds. Says what it
    removes; a file's content that a listed duplicate also holds stays, under the duplicate."""
    from flows.runtime import workspace_lock
    from preprocess.video import remove_sources

    manifest = Workspace(Path(workspace).absolute()).videos_manifest
    if not manifest.is_file():
        raise typer.BadParameter(
            f"{Path(workspace).absolute()}: no videos manifest, nothing was ingested there", param_hint="--workspace"
        )
    with workspace_lock(workspace, wait):  # no Prefect, no free-space check: removing is how space is made
        plan = remove_sources(workspace, paths, dry_run=True)
        if not plan.rows:
            raise NothingDone(f"no file listed in {manifest} is at or under {', '.join(map(str, paths))}")
        table = Table(title=f"{'would remove' if dry_run else 'removing'} {len(plan.rows)} file(s) from the manifest")
        for column in ("file", "status", "its clips"):
            table.add_column(column)
        for row in plan.rows:
            fate = (
                f"kept, now under {plan.inherited[row.path]}"
                if row.path in plan.inherited
                else (f"{sum(c.source_path == row.path for c in plan.clips)} removed" if row.status == "ok" else "-")
            )
            table.add_row(row.path, row.status.value, fate)
        console.print(table, markup=False, highlight=False)
        console.print(
            f"{len(plan.clips)} clip(s) no listed file holds: their clip, pose and mask files and manifest rows go"
        )
        if dry_run or not (yes or typer.confirm("remove them?")):
            console.print("nothing removed")
            return
        done = remove_sources(workspace, paths)
    console.print(
        f"removed {len(done.rows)} file(s) from the manifest, {len(done.clips)} clip(s), {len(done.files)} product file(s); "
        "shards made before keep their samples until the next `multianimate preprocess`"
    )


@app.command("data-card")
def data_card(workspace: WorkspaceOpt = Path("workspace"), config: ConfigOpt = None) -> None:
    """Write reports/data-card.md again from the manifests, with the profile's shards.filters
    (what they would remove; the shards change at the next preprocess)."""
    from data_schemas import load_config
    from preprocess.data_card import write_data_card

    manifest = Workspace(Path(workspace).absolute()).quality_manifest
    if not manifest.is_file():
        raise typer.BadParameter(
            f"{manifest}: missing; `multianimate preprocess` measures the clips", param_hint="--workspace"
        )
    try:
        filters = load_config(config).shards.filters
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"data card: {write_data_card(workspace, filters)}")


def main() -> None:
    """Run the verb; on failure, end with one line naming the cause (after the Prefect
    server's shutdown messages) and the exit code of the module's docstring."""
    ending: list[str] = []
    # atexit runs its handlers last-registered first: registered before Prefect exists, this
    # line comes after everything Prefect prints at exit (its temporary server's shutdown)
    atexit.register(lambda: ending and print(f"error: {ending[0]}", file=sys.stderr, flush=True))
    try:
        code = app(standalone_mode=False)
    except _USAGE_ERRORS as exc:  # bad arguments: click's message, which ends with "Error: ..."
        exc.show()
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        ending.append("interrupted")
        code = EXIT_INTERRUPTED
    except WorkspaceBusy as exc:
        ending.append(str(exc))
        code = EXIT_BUSY
    except NothingDone as exc:
        ending.append(str(exc))
        code = EXIT_FAILED
    except Exception as exc:
        if not isinstance(exc, ValueError):  # ours name the file and the reason: no traceback needed
            traceback.print_exception(exc)
        ending.append(failure_cause(exc))
        code = EXIT_FAILED
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
