"""Image reports: a grid of pictures written under reports/ and shown in a markdown artifact,
and ``inline_image``, the one way an artifact shows a picture (artifacts live in Prefect's
database: no links to files, which the UI's browser may not reach)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from prefect.artifacts import create_markdown_artifact

from data_schemas.atomic import atomic_write_bytes

TILE_HEIGHT = 192
GRID_THUMB_WIDTH = 1024
JPEG_QUALITY = 85


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """RGB images in rows, each scaled to TILE_HEIGHT high (aspect kept), with black gaps."""
    lines = []
    for row in rows:
        scaled = [
            cv2.resize(
                im, (max(1, round(im.shape[1] * TILE_HEIGHT / im.shape[0])), TILE_HEIGHT), interpolation=cv2.INTER_AREA
            )
            for im in row
        ]
        lines.append(np.concatenate([np.pad(s, ((0, 0), (0, gap), (0, 0))) for s in scaled], axis=1))
    width = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, gap), (0, width - line.shape[1]), (0, 0))) for line in lines], axis=0)


def inline_image(
    image: Path | np.ndarray, alt: str, max_width: int | None = None, fmt: Literal["jpeg", "png"] = "jpeg"
) -> str:
    """Markdown showing ``image`` inline (a base64 data URL): an RGB array, or an image file.
    Wider than ``max_width``: scaled down (aspect kept). JPEG for pictures, PNG for line art
    (plots). An unreadable file gives a note naming it instead of failing the report."""
    if isinstance(image, np.ndarray):
        bgr = np.ascontiguousarray(image[..., ::-1]) if image.ndim == 3 else image  # our arrays are RGB, OpenCV's BGR
    else:
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            return f"({alt} {image} unreadable)"
    if max_width is not None and bgr.shape[1] > max_width:
        bgr = cv2.resize(bgr, (max_width, round(bgr.shape[0] * max_width / bgr.shape[1])), interpolation=cv2.INTER_AREA)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if fmt == "jpeg" else []
    ok, data = cv2.imencode(f".{'jpg' if fmt == 'jpeg' else 'png'}", bgr, params)
    assert ok
    return f"![{alt}](data:image/{fmt};base64,{base64.b64encode(data.tobytes()).decode()})"


def publish_image_grid(workspace: Path, relative_path: str, key: str, title: str, rows: list[list[np.ndarray]]) -> Path:
    """Write the grid as a PNG under the workspace and show a JPEG thumbnail of it in a markdown artifact."""
    sheet = grid(rows)
    ok, png = cv2.imencode(".png", sheet[..., ::-1])
    assert ok
    path = atomic_write_bytes(Path(workspace) / relative_path, png.tobytes())
    markdown = f"### {title}\n\nFull size: `{path}`\n\n{inline_image(sheet, key, max_width=GRID_THUMB_WIDTH)}"
    create_markdown_artifact(key=key, markdown=markdown, description=title)
    return path
