"""Import the seed's data layouts (processed_data/ pickles, demo folders) into a workspace."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from data_schemas import write_records
from data_schemas.legacy import LegacyClip
from data_schemas.workspace import Workspace
from preprocess.legacy import find_legacy
from tasks.legacy import import_legacy_folder


@flow(name="import-legacy", flow_run_name="import-legacy {root}")
def import_legacy(root: Path, workspace: Path, trust_pickles: bool = False, fps: float = 25.0) -> list[LegacyClip]:
    """Every importable folder under ``root`` becomes a clip, pose images (kept as given) and a
    label map; folders that fail are reported and the others go on."""
    logger = get_run_logger()
    workspace = Path(workspace).absolute()
    found = find_legacy(Path(root))
    futures = [
        (folder, import_legacy_folder.submit(kind, folder, workspace, trust_pickles, fps)) for kind, folder in found
    ]
    clips, rows = [], []
    for folder, future in futures:
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            logger.error("%s", outcome)
            rows.append({"folder": str(folder), "clip": "", "error": str(outcome)})
        else:
            clips.append(outcome)
            rows.append({"folder": str(folder), "clip": outcome.clip_id, "error": ""})
    write_records(clips, LegacyClip, Workspace(workspace).manifest("legacy"))
    create_table_artifact(
        key="legacy-import",
        table=rows or [{"folder": str(root), "clip": "", "error": "nothing to import"}],
        description="Seed folders imported",
    )
    logger.info("imported %d of %d folder(s)", len(clips), len(found))
    return clips
