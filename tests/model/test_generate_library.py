"""Generation as plain library calls, without Prefect: ``model.generate.run_job`` on the tiny
profile, the one embedding-fill (``model.text_cache.ensure_cached``) and the one inline
image of the artifacts (``tasks.reports.inline_image``)."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from bench.fault_cases import generate as cases
from data_schemas.config import PoseConfig
from data_schemas.job import JobSpec, JobTimeout
from data_schemas.workspace import Workspace
from model.text_encoder import WAN_NEGATIVE_PROMPT, tiny_encoder_id


def test_run_job_writes_the_outputs_and_caches_the_prompts_without_prefect(tmp_path):
    from model.generate import run_job

    ws = Workspace(tmp_path / "ws")
    inputs = cases.job_inputs(tmp_path / "in")
    spec = JobSpec(
        reference=inputs["reference"],
        poses=inputs["poses"],
        masks=inputs["masks"],
        reference_poses=inputs["reference_poses"],
        steps=2,
        num_frames=5,
        height=64,
        width=32,
    )
    out = tmp_path / "out"
    out.mkdir()
    # the reference's poses are given: no DWPose model files
    result = run_job(spec, spec.poses, spec.masks, PoseConfig(), (), ws, out)
    assert sorted(p.name for p in out.iterdir()) == ["preview.mp4", "preview.png", "video.mp4"]
    # named where the generate flow publishes them
    assert result.outputs == {
        name: f"outputs/{spec.job_id}/{file}"
        for name, file in [("video", "video.mp4"), ("preview", "preview.mp4"), ("preview_image", "preview.png")]
    }
    assert result.num_persons == 2 and sorted(result.person_map.values()) == [1, 2]
    assert result.prompt == "two person are dancing"
    assert {"reference_pose_s", "retarget_s", "embeddings_s", "load_model_s", "write_s"} <= set(result.timings)
    assert cv2.imread(str(out / "preview.png")).shape == (64, 3 * 32, 3)

    from model.text_cache import EmbeddingCache

    cache = EmbeddingCache(ws.embeddings, tiny_encoder_id())
    assert set(cache.texts) == {result.prompt, WAN_NEGATIVE_PROMPT}

    # a limit already passed: stopped at the first check, nothing written
    late = tmp_path / "late"
    late.mkdir()
    with pytest.raises(
        JobTimeout, match=f"job {spec.job_id} ran over its time limit of 0 s .* after the reference pose"
    ):
        run_job(spec, spec.poses, spec.masks, PoseConfig(), (), ws, late, timeout_s=0)
    assert list(late.iterdir()) == []


def test_ensure_cached_loads_the_encoder_only_for_missing_texts(tmp_path):
    from model.text_cache import ensure_cached

    loads = []
    first = ensure_cached(tmp_path, "tiny", None, ["a", "b", "a"], before_load=lambda: loads.append(1))
    assert (first.encoder_id, first.num_texts, first.num_new, first.num_existing, loads) == (
        tiny_encoder_id(),
        2,
        2,
        0,
        [1],
    )
    again = ensure_cached(tmp_path, "tiny", None, ["b", "a"], before_load=lambda: loads.append(2))
    assert (again.num_new, again.num_existing, loads) == (0, 2, [1])  # all cached: no encoder
    more = ensure_cached(tmp_path, "tiny", None, ["a", "c"], before_load=lambda: loads.append(3))
    assert (more.num_texts, more.num_new, more.num_existing, loads) == (2, 1, 1, [1, 3])


def _decoded(markdown: str, alt: str, fmt: str) -> np.ndarray:
    prefix = f"![{alt}](data:image/{fmt};base64,"
    assert markdown.startswith(prefix) and markdown.endswith(")")
    return cv2.imdecode(np.frombuffer(base64.b64decode(markdown[len(prefix) : -1]), np.uint8), cv2.IMREAD_COLOR)


def test_inline_image_of_an_array_a_file_and_an_unreadable_file(tmp_path):
    from tasks.reports import inline_image

    rgb = np.zeros((40, 100, 3), np.uint8)
    rgb[..., 0] = 255  # red
    thumb = _decoded(inline_image(rgb, "grid", max_width=50), "grid", "jpeg")
    assert thumb.shape == (20, 50, 3) and thumb[10, 25, 2] > 200 and thumb[10, 25, 0] < 50  # BGR: red stays red
    path = tmp_path / "plot.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    np.testing.assert_array_equal(
        _decoded(inline_image(path, "plot", fmt="png"), "plot", "png"), rgb[..., ::-1]
    )  # lossless
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert inline_image(tmp_path / "bad.png", "preview") == f"(preview {tmp_path / 'bad.png'} unreadable)"
