"""Held-out evaluation end to end on the CPU: `multianimate score` on a folder with missing,
truncated and resized videos, and the evaluate flow (generation through the job queue, then
scoring) with its rerun that generates nothing and scores from the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_schemas import read_records
from data_schemas.config import ProjectConfig, ShardConfig
from data_schemas.evaluation import EvalConfig, EvalRow, EvalSummary, Protocol
from data_schemas.model import ModelConfig
from data_schemas.shard import ShardSample
from data_schemas.workspace import Workspace
from preprocess.media import read_frames, write_video
from tests.helpers.cli import cli_env, task_states, temp_files
from tests.helpers.workspaces import make_workspace

CLI = [sys.executable, "-m", "flows.cli"]
# compared at the clips' own size (96 px high): the protocol's 480 would only upscale
SMALL = Protocol(short_side=96)


def held_out_workspace(root: Path, num_clips: int) -> Workspace:
    """Synthetic two-person clips (12 frames, 128x96), one source each, all held out."""
    from preprocess.shards import write_shards

    make_workspace(root, num_clips=num_clips, clips_per_source=1)
    write_shards(root, ShardConfig(val_fraction=1.0))
    return Workspace(root)


def profile(tmp_path: Path, **evaluate) -> Path:
    import yaml

    path = tmp_path / "profile.yaml"
    config = {"pose": {"models": "truth"}, "evaluate": {"protocol": {"short_side": 96}, **evaluate}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_score_rows_every_clip_with_its_reason_and_truth_scores_perfectly(tmp_path):
    ws = held_out_workspace(tmp_path / "ws", 5)
    clips = [s.key for s in read_records(ws.shards_index, ShardSample)]
    assert len(clips) == 5
    videos = tmp_path / "videos"
    videos.mkdir()
    missing, truncated, resized, *good = clips
    for clip in good:
        shutil.copy(ws.clip_file(clip), videos / f"{clip}.mp4")
    data = ws.clip_file(truncated).read_bytes()
    (videos / f"{truncated}.mp4").write_bytes(data[: len(data) // 2])
    frames = read_frames(ws.clip_file(resized))
    wide = np.repeat(frames, 2, axis=2)  # 256x96: the wrong size, resampled by the protocol
    write_video(wide, videos / f"{resized}.mp4", fps=12.5)  # and the wrong rate
    (videos / "not-held-out.mp4").write_bytes(b"ignored")

    done = subprocess.run(
        [*CLI, "score", str(videos), "-w", str(ws.root), "-c", str(profile(tmp_path))],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny random" in done.stdout and "not scores" in done.stdout  # the networks are named

    rows = read_records(ws.eval_clips("videos"), EvalRow)
    clip_rows = {r.clip_id: r for r in rows if r.person == 0}
    assert sorted(clip_rows) == sorted(clips)
    assert clip_rows[missing].status == "missing" and "no such video" in clip_rows[missing].reason
    assert clip_rows[truncated].status == "undecodable" and "not a clean decode" in clip_rows[truncated].reason
    assert clip_rows[resized].status == "ok"
    assert "fps 12.5 -> 25" in clip_rows[resized].resampling and "256x96 -> 128x96" in clip_rows[resized].resampling
    for clip in good:
        row = clip_rows[clip]
        assert row.status == "ok" and row.reason == "" and row.resampling == ""
        assert row.psnr == 100.0 and row.ssim == pytest.approx(1.0) and row.lpips == pytest.approx(0.0, abs=1e-6)
        assert row.swap_rate == 0.0 and row.tiny_networks and "tiny random" in row.networks
        persons = [r for r in rows if r.clip_id == clip and r.person > 0]
        assert [p.person for p in persons] == [1, 2] and all(p.psnr == 100.0 for p in persons)
    for clip in (missing, truncated):
        assert all(r.person == 0 for r in rows if r.clip_id == clip)
    (summary,) = read_records(ws.eval_summary("videos"), EvalSummary)
    assert summary.num_clips == 3 and summary.tiny_networks and summary.protocol_digest == SMALL.digest()
    assert "pck: not measured" in summary.networks  # truth pose models: no re-detection of generated persons
    assert clip_rows[resized].psnr < 100.0  # a slowed, squashed copy is no longer the truth
    for clip in (missing, truncated):
        assert clip in done.stdout
    assert (ws.eval("videos") / "preview.png").is_file() and temp_files(ws.root) == []


@pytest.mark.slow
def test_evaluate_generates_held_out_clips_once_and_rescoring_is_cached(tmp_path, prefect_api):
    from flows.evaluate import compare, evaluate

    ws = held_out_workspace(tmp_path / "ws", 2)
    clips = sorted(s.key for s in read_records(ws.shards_index, ShardSample))
    config = ProjectConfig(
        pose={"models": "truth"},
        evaluate=EvalConfig(protocol=SMALL, steps=2, short_side=None),
        model=ModelConfig(),
    )
    state = evaluate(ws.root, "base", "first", config, return_state=True)
    outcome = state.result()
    assert outcome.num_clips == outcome.num_scored == 2 and outcome.not_scored == {}
    assert len(outcome.generated) == 2 and outcome.finished_before == []
    assert outcome.tiny_networks and "tiny random" in outcome.networks
    # the jobs went through the queue: each clip's first frame, poses and label map
    for job_id in outcome.generated:
        spec = json.loads((ws.queue / f"{job_id}.json").read_text())
        clip = Path(spec["poses"]).stem
        assert spec["reference"] == str((ws.eval("first") / "references" / f"{clip}.png").absolute())
        assert spec["masks"] == str(ws.mask_file(clip).absolute()) and spec["num_frames"] == 9
        assert (spec["width"], spec["height"], spec["fps"]) == (128, 96, 25.0)
        assert sorted(p.name for p in ws.output(job_id).iterdir()) == [
            "job.json",
            "preview.mp4",
            "preview.png",
            "video.mp4",
        ]
    rows = read_records(ws.eval_clips("first"), EvalRow)
    assert sorted(r.clip_id for r in rows if r.person == 0) == clips
    assert all(r.status == "ok" and r.num_frames == 9 for r in rows)  # truth cut to the generated 9 frames
    assert {p.name for p in ws.eval("first").iterdir()} == {
        "metrics.parquet",
        "per_clip.parquet",
        "preview.png",
        "references",
    }
    first = {p: p.read_bytes() for p in (ws.eval_clips("first"), ws.eval_summary("first"))}
    states = task_states(state.state_details.flow_run_id, 4)
    assert sorted(states) == sorted([f"score {c}" for c in clips] + ["generate " + j for j in outcome.generated])

    again_state = evaluate(ws.root, "base", "first", config, return_state=True)
    again = again_state.result()
    assert again.generated == [] and sorted(again.finished_before) == sorted(outcome.generated)
    states = task_states(again_state.state_details.flow_run_id, 2)
    assert states == {f"score {c}": "Cached" for c in clips}
    assert {p: p.read_bytes() for p in first} == first  # the same bytes from the cached scores

    table, notes = compare(ws.root, "first", "first")
    assert [row["measure"] for row in table][:3] == ["clips", "psnr", "ssim"]
    assert all(row["B - A"] in (0, None) for row in table)
    assert any("tiny random" in note for note in notes)
