"""Image reports: a grid of pictures written under reports/ and shown in a markdown artifact."""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np
from prefect.artifacts import create_markdown_artifact

from data_schemas.atomic import atomic_write_bytes

TILE_HEIGHT = 192


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """RGB images in rows, each scaled to TILE_HEIGHT high (aspect kept), with black gaps."""
    lines = []
    for row in rows:
        scaled = [cv2.resize(im, (max(1, round(im.shape[1] * TILE_HEIGHT / im.shape[0])), TILE_HEIGHT), interpolation=cv2.INTER_AREA) for im in row]
        lines.append(np.concatenate([np.pad(s, ((0, 0), (0, gap), (0, 0))) for s in scaled], axis=1))
    width = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, gap), (0, width - line.shape[1]), (0, 0))) for line in lines], axis=0)


def publish_image_grid(workspace: Path, relative_path: str, key: str, title: str, rows: list[list[np.ndarray]]) -> Path:
    """Write the grid as a PNG under the workspace and show a JPEG thumbnail of it in a markdown artifact."""
    sheet = grid(rows)
    ok, png = cv2.imencode(".png", sheet[..., ::-1])
    assert ok
    path = atomic_write_bytes(Path(workspace) / relative_path, png.tobytes())
    width = min(1024, sheet.shape[1])
    thumb = cv2.resize(sheet, (width, int(sheet.shape[0] * width / sheet.shape[1])), interpolation=cv2.INTER_AREA)
    _, jpeg = cv2.imencode(".jpg", thumb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    data = base64.b64encode(jpeg.tobytes()).decode()
    markdown = f"### {title}\n\nFull size: `{path}`\n\n![{key}](data:image/jpeg;base64,{data})"
    create_markdown_artifact(key=key, markdown=markdown, description=title)
    return path
