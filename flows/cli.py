"""The ``multianimate`` command line: one verb per flow.

Prefect is imported only inside the commands, after ``use_workspace`` has pointed its
home at the workspace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.runtime import use_workspace

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MultiAnimate: raw videos -> training data -> model -> videos.")
console = Console()

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="folder that holds every product")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="profile YAML (default: built-in defaults)")]


def _checked_config(folder: Path, config: Path | None, weights: bool = True):
    """The profile, checked before anything is created: the input folder, the values, the
    weight files it names (one clear message for whatever is missing)."""
    from data_schemas import load_config

    if not folder.is_dir():
        raise typer.BadParameter(f"{folder}: not a folder", param_hint="FOLDER")
    try:
        cfg = load_config(config)
        if weights and cfg.pose.models == "files":
            cfg.pose.model_files()
        if weights and cfg.segment.models == "files":
            cfg.segment.model_folder()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return cfg


def _print_summary(summary) -> None:
    table = Table(title="ingest")
    for column in ("files", "ok", "failed", "duplicates", "clips"):
        table.add_column(column, justify="right")
    table.add_row(*(str(v) for v in (summary.num_files, summary.num_ok, summary.num_failed, summary.num_duplicates, summary.num_clips)))
    console.print(table)
    console.print(f"videos manifest: {summary.videos_manifest}\nclips manifest:  {summary.clips_manifest}")


@app.command()
def ingest(
    folder: Annotated[Path, typer.Argument(help="folder of raw videos, walked recursively")],
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    dask_address: Annotated[Optional[str], typer.Option(help="run tasks on a Dask cluster, e.g. tcp://127.0.0.1:8786")] = None,
    workers: Annotated[Optional[int], typer.Option(help="local worker threads (default: CPU count)")] = None,
) -> None:
    """Validate, deduplicate and cut a folder of raw videos into normalised clips."""
    cfg = _checked_config(folder, config, weights=False)
    workspace = use_workspace(workspace)
    from flows.ingest import ingest as ingest_flow
    from flows.runtime import make_task_runner

    try:
        runner = make_task_runner(dask_address, workers)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = ingest_flow.with_options(task_runner=runner)(folder, workspace, cfg.ingest)
    _print_summary(summary)


def _print_preprocess(summary) -> None:
    console.print(f"poses of {summary.num_posed}/{summary.num_clips} clip(s): {summary.poses_manifest}")
    console.print(f"masks of {summary.num_segmented}/{summary.num_clips} clip(s): {summary.masks_manifest}")
    console.print(f"{summary.num_samples} training sample(s) in shards: {summary.shards_index}")
    if summary.failed_clips:
        console.print(f"[red]failed clips: {', '.join(summary.failed_clips)}[/red]")
    for name, path in (("contact sheet", summary.contact_sheet), ("mask overlays", summary.mask_overlays)):
        if path:
            console.print(f"{name}: {path}")


@app.command()
def preprocess(
    folder: Annotated[Path, typer.Argument(help="folder of raw videos, walked recursively")],
    workspace: WorkspaceOpt = Path("workspace"),
    config: ConfigOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="local worker threads (default: CPU count)")] = None,
) -> None:
    """Ingest a folder of raw videos, extract poses of every clip, then track every person."""
    cfg = _checked_config(folder, config)
    workspace = use_workspace(workspace)
    from flows.preprocess import preprocess as preprocess_flow
    from flows.runtime import make_task_runner

    summary = preprocess_flow.with_options(task_runner=make_task_runner(None, workers))(folder, workspace, cfg)
    _print_preprocess(summary)


@app.command("import-legacy")
def import_legacy(
    root: Annotated[Path, typer.Argument(help="folder holding processed_data/<video>/ pickles and/or demo folders")],
    workspace: WorkspaceOpt = Path("workspace"),
    trust_pickles: Annotated[bool, typer.Option("--trust-pickles", help="unpickle the seed's .pkl files: they can run code, "
                                                "so only for data from a source you trust")] = False,
    fps: Annotated[float, typer.Option(help="frame rate of the imported clips")] = 25.0,
) -> None:
    """Import the seed's training pickles and demo folders as clips, pose images and label maps."""
    if not root.is_dir():
        raise typer.BadParameter(f"{root}: not a folder", param_hint="ROOT")
    workspace = use_workspace(workspace)
    from flows.legacy import import_legacy as import_flow

    clips = import_flow(root, workspace, trust_pickles=trust_pickles, fps=fps)
    console.print(f"imported {len(clips)} clip(s) into {workspace} (manifests/legacy.parquet)")


@app.command()
def demo(
    workspace: WorkspaceOpt = Path("workspace"),
    num_videos: Annotated[int, typer.Option(help="synthetic sample videos to generate")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the sample videos")] = 0,
) -> None:
    """The whole pipeline on generated sample videos with tiny models on the CPU."""
    workspace = use_workspace(workspace)
    from flows.demo import demo as demo_flow

    summary = demo_flow(workspace, num_videos=num_videos, seed=seed)
    _print_preprocess(summary)
    console.print(f"workspace: {workspace}")


@app.command()
def weights(config: ConfigOpt = None) -> None:
    """Check that every real weight file the profile names is present; say how to get the rest."""
    from data_schemas import load_config

    try:
        cfg = load_config(config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    checks = []  # (stage, what, problem or "")
    for stage, uses_files, check in (
        ("pose", cfg.pose.models == "files", cfg.pose.model_files),
        ("segment", cfg.segment.models == "files", cfg.segment.model_folder),
        ("model", cfg.model.profile != "tiny", cfg.model.require_weights),
    ):
        if not uses_files:
            checks.append((stage, "tiny random-weight models (built in code)", ""))
            continue
        try:
            check()
            checks.append((stage, "real weights", ""))
        except ValueError as exc:
            checks.append((stage, "real weights", str(exc)))
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
