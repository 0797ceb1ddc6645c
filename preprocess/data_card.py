"""The data card: reports/data-card.md (+ its PNGs), what a user reads about their data
before spending GPU days on it: counts, a histogram of each quality measure, what each
filter of ``shards.filters`` removes, and thumbnails of the five worst clips per measure.

Made from the manifests only (clips, quality), so ``multianimate data-card`` writes it again
at any time, e.g. after changing the filters."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_schemas import ClipRecord, read_records
from data_schemas.atomic import atomic_write_bytes
from data_schemas.config import QualityFilters
from data_schemas.quality import ClipQuality
from data_schemas.workspace import Workspace
from preprocess.media import read_frames

WORST = 5
THUMB_HEIGHT = 72

# (field, what it says, which end is worse): the clip-level measures the card shows
MEASURES: tuple[tuple[str, str, str], ...] = (
    ("num_visible_persons", "visible persons", "low"),
    ("min_person_height", "smallest person's height / frame height", "low"),
    ("min_body_confidence", "lowest body keypoint confidence of a person", "low"),
    ("min_mask_stability", "lowest mask stability (IoU between frames) of a person", "low"),
    ("max_occlusion_share", "highest occlusion share of a person", "high"),
    ("num_identity_switches", "suspected identity switches", "high"),
    ("num_disagreement_frames", "frames where pose and mask disagree", "high"),
    ("motion", "motion: fastest person's keypoint speed (frame heights / frame)", "low"),
    ("blur", "sharpness: variance of the Laplacian", "low"),
    ("brightness", "brightness (0..1)", "low"),
)


def _histogram(values: Sequence[float], title: str, path: Path) -> None:
    # A Figure of its own, not pyplot's global state (safe beside other threads), with fixed
    # margins: tight_layout drew each figure twice, half the card's time.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2.4), dpi=100)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.88)
    ax = fig.add_subplot()
    ax.hist(values, bins=min(20, max(1, len(set(values)))), color="#3b6ea5")
    ax.set_title(title, fontsize=8)
    ax.set_ylabel("clips", fontsize=8)
    ax.tick_params(labelsize=7)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())


def _thumbnails(ws: Workspace, clips: Sequence[ClipRecord], path: Path) -> None:
    """Each clip's middle frame, side by side, at one height."""
    import cv2

    tiles = []
    for clip in clips:
        (frame,) = read_frames(ws.resolve(clip.path), [clip.num_frames // 2])
        width = max(1, round(frame.shape[1] * THUMB_HEIGHT / frame.shape[0]))
        tiles.append(cv2.resize(frame, (width, THUMB_HEIGHT), interpolation=cv2.INTER_AREA))
        tiles.append(np.full((THUMB_HEIGHT, 4, 3), 255, np.uint8))
    _, png = cv2.imencode(".png", np.concatenate(tiles, axis=1)[..., ::-1])
    atomic_write_bytes(path, png.tobytes())


def _inputs_line(rows: Sequence[ClipQuality], clips: dict[str, ClipRecord], filters: QualityFilters) -> str:
    """The card's last line: a digest of everything it is drawn from (rows, clips, filters, this code)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for record in [*rows, *clips.values(), filters]:
        digest.update(record.model_dump_json().encode())
    return f"<!-- drawn from inputs {digest.hexdigest()[:16]} -->"


def _is_current(ws: Workspace, inputs: str) -> bool:
    """The card on disk was drawn from these inputs and its figures are all there."""
    try:
        text = ws.data_card.read_text()
    except OSError:
        return False
    figures = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    return text.rstrip("\n").endswith(inputs) and all((ws.data_card.parent / f).is_file() for f in figures)


def write_data_card(workspace: Workspace | Path, filters: QualityFilters) -> Path:
    """reports/data-card.md and its figures, from the workspace's manifests; returns its path.
    A card already drawn from the same manifests' rows and filters is kept as it is (drawing
    the figures is most of a rerun that has nothing else to do)."""
    ws = Workspace.of(workspace)
    rows = read_records(ws.quality_manifest, ClipQuality)
    clips = {c.clip_id: c for c in read_records(ws.clips_manifest, ClipRecord)}
    inputs = _inputs_line(rows, clips, filters)
    if _is_current(ws, inputs):
        return ws.data_card
    figures = ws.data_card_figures
    link = figures.relative_to(ws.data_card.parent).as_posix()  # the card's links to its figures
    figures.mkdir(parents=True, exist_ok=True)
    kept = [r for r in rows if not filters.reasons(r)]
    lines = [
        "# Data card",
        "",
        f"{len(rows)} clip(s) measured, {sum(r.num_frames for r in rows)} frames, "
        f"{sum(r.num_visible_persons for r in rows)} visible person(s); "
        f"**{len(kept)}** clip(s) pass the filters and go into the shards.",
        "",
        "## What the filters remove",
        "",
        f"Filters (`shards.filters`): `{filters.model_dump(exclude_none=True)}`; a clip counts under every filter it fails.",
        "",
        "| filter | clips removed | example |",
        "| --- | --- | --- |",
    ]
    removed: dict[str, list[str]] = {}
    for row in rows:
        for name, why in filters.explain(row).items():
            removed.setdefault(name, []).append(f"{row.clip_id}: {why}")
    lines += [f"| {name} | {len(why)} | {why[0]} |" for name, why in removed.items()] or ["| (none) | 0 | |"]
    lines += ["", "## Measures", ""]
    for field, title, worse in MEASURES:
        measured = [(getattr(r, field), r.clip_id) for r in rows if getattr(r, field) is not None]
        lines += [f"### {title} (`{field}`)", ""]
        if not measured:
            lines += ["nothing measured", ""]
            continue
        _histogram([v for v, _ in measured], title, figures / f"{field}.png")
        worst = sorted(measured, key=lambda m: (m[0] if worse == "low" else -m[0], m[1]))[:WORST]
        with_video = [clips[c] for _, c in worst if c in clips]
        if with_video:
            _thumbnails(ws, with_video, figures / f"{field}-worst.png")
        lines += [
            f"![{field}]({link}/{field}.png)",
            "",
            f"Worst {len(worst)}: " + ", ".join(f"`{c}` ({v:.3g})" for v, c in worst),
            "",
        ]
        if with_video:
            lines += [f"![worst {field}]({link}/{field}-worst.png)", ""]
    lines += [inputs]
    return atomic_write_bytes(ws.data_card, ("\n".join(lines) + "\n").encode())
