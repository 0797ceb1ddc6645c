"""Small DWPose-shaped ONNX models, exported from torch at run time.

They have the real models' I/O signatures (spec A.3, A.4) so the runner cannot tell them
apart from ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx``:

    detector  images  float32 [1, 3, 640, 640]  ->  output  float32 [1, 8400, 85]
    pose      input   float32 [N, 3, 384, 288]  ->  simcc_x float32 [N, 133, 576]
                                                    simcc_y float32 [N, 133, 768]

``tiny`` models have random (seeded) weights: the profile for tests and the demo on a CPU.
``crafted`` models ignore their input's values and return given constants, so tests know
exactly which boxes and keypoints the runner must decode.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_schemas.atomic import atomic_path
from preprocess.pose.dwpose import DET_INPUT, SIMCC_RATIO, STRIDES  # the runner's signature, which these models share

POSE_INPUT = (384, 288)  # (h, w)
NUM_KEYPOINTS = 133
NUM_ANCHORS = sum((DET_INPUT[0] // s) * (DET_INPUT[1] // s) for s in STRIDES)  # 8400


class TinyYolox(nn.Module):
    """Three strided feature levels, one 1x1 head each; objectness and classes are sigmoids
    (the real export's scores are probabilities, its box values raw)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 8, stride=8), nn.SiLU())
        self.down = nn.ModuleList(
            [nn.Identity(), nn.Conv2d(width, width, 2, stride=2), nn.Conv2d(width, width, 2, stride=2)]
        )
        self.heads = nn.ModuleList([nn.Conv2d(width, 85, 1) for _ in STRIDES])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images / 255.0)
        outputs = []
        for down, head in zip(self.down, self.heads):
            x = down(x)
            outputs.append(head(x).flatten(2))  # [B, 85, h*w], row-major cells as YOLOX grids
        raw = torch.cat(outputs, dim=2).transpose(1, 2)
        return torch.cat([raw[..., :4], torch.sigmoid(raw[..., 4:])], dim=-1)


class TinySimcc(nn.Module):
    """Conv features to one 12x9 map per keypoint, then shared linear SimCC heads."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=4),
            nn.SiLU(),
            nn.Conv2d(width, NUM_KEYPOINTS, 2, stride=2),
        )
        cells = (POSE_INPUT[0] // 32) * (POSE_INPUT[1] // 32)
        self.head_x = nn.Linear(cells, int(POSE_INPUT[1] * SIMCC_RATIO))
        self.head_y = nn.Linear(cells, int(POSE_INPUT[0] * SIMCC_RATIO))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.features(crops).flatten(2)  # [N, 133, 108]
        return self.head_x(maps), self.head_y(maps)


class Constant(nn.Module):
    """Returns fixed tensors whatever the input holds (the input still flows into the graph,
    so it keeps its name, shape and batch dimension)."""

    def __init__(self, *values: np.ndarray, batch_follows_input: bool):
        super().__init__()
        self.values = nn.ParameterList(
            [nn.Parameter(torch.from_numpy(np.asarray(v, np.float32)), requires_grad=False) for v in values]
        )
        self.batch_follows_input = batch_follows_input

    def forward(self, x: torch.Tensor):
        zero = (x.flatten(1)[:, :1] * 0.0).reshape(-1, *([1] * (self.values[0].dim() - 1)))
        outs = [
            v.expand(x.shape[0], *v.shape[1:]) + zero if self.batch_follows_input else v + zero for v in self.values
        ]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str], dynamic_batch: bool
) -> Path:
    module.eval()
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes=dynamic,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    return path


def export_detector(module: nn.Module, path: Path) -> Path:
    return _export(module, torch.zeros(1, 3, *DET_INPUT), path, "images", ["output"], dynamic_batch=False)


def export_pose(module: nn.Module, path: Path) -> Path:
    return _export(module, torch.zeros(2, 3, *POSE_INPUT), path, "input", ["simcc_x", "simcc_y"], dynamic_batch=True)


def _tiny_key(seed: int) -> str:
    source = inspect.getsource(TinyYolox) + inspect.getsource(TinySimcc) + torch.__version__
    return hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()[:12]


def build_tiny_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Seeded random tiny detector and pose model under ``folder`` (built once, then reused)."""
    key = _tiny_key(seed)
    detector, pose = Path(folder) / f"tiny-yolox-{key}.onnx", Path(folder) / f"tiny-simcc-{key}.onnx"
    if not detector.exists():
        torch.manual_seed(seed)
        export_detector(TinyYolox(), detector)
    if not pose.exists():
        torch.manual_seed(seed + 1)
        export_pose(TinySimcc(), pose)
    return detector, pose


def detector_output_for_boxes(boxes_xyxy: np.ndarray, scores: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """The raw [1, 8400, 85] detector output that decodes to ``boxes`` (image pixels) as
    persons with ``scores``: each box is written at the stride-8 cell under its centre."""
    height, width = image_hw
    ratio = min(DET_INPUT[0] / height, DET_INPUT[1] / width)
    out = np.zeros((1, NUM_ANCHORS, 85), np.float32)
    cells_w = DET_INPUT[1] // STRIDES[0]
    for (x1, y1, x2, y2), score in zip(np.asarray(boxes_xyxy, np.float64) * ratio, scores):
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        gx, gy = int(cx // STRIDES[0]), int(cy // STRIDES[0])
        row = out[0, gy * cells_w + gx]
        row[:4] = [cx / STRIDES[0] - gx, cy / STRIDES[0] - gy, np.log(w / STRIDES[0]), np.log(h / STRIDES[0])]
        row[4], row[5] = 1.0, score  # objectness x person probability = score
    return out


def simcc_for_points(points_xy: np.ndarray, peak: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """SimCC outputs [1, 133, 576] and [1, 133, 768] peaking at crop-pixel ``points_xy`` [133, 2];
    a point with a NaN coordinate gets no peak (score 0, i.e. not found)."""
    simcc_x = np.zeros((1, NUM_KEYPOINTS, int(POSE_INPUT[1] * SIMCC_RATIO)), np.float32)
    simcc_y = np.zeros((1, NUM_KEYPOINTS, int(POSE_INPUT[0] * SIMCC_RATIO)), np.float32)
    for k, (x, y) in enumerate(points_xy):
        if np.isnan(x) or np.isnan(y):
            continue
        simcc_x[0, k, int(round(x * SIMCC_RATIO))] = peak
        simcc_y[0, k, int(round(y * SIMCC_RATIO))] = peak
    return simcc_x, simcc_y


def build_crafted_models(
    folder: Path, detector_output: np.ndarray, simcc: tuple[np.ndarray, np.ndarray]
) -> tuple[Path, Path]:
    """Constant-output models (see module docstring) for exactness tests."""
    folder = Path(folder)
    detector = export_detector(Constant(detector_output, batch_follows_input=False), folder / "crafted-yolox.onnx")
    pose = export_pose(Constant(*simcc, batch_follows_input=True), folder / "crafted-simcc.onnx")
    return detector, pose
