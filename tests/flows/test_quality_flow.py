"""The quality stage in the preprocess flow: measures in manifests/quality.parquet, the
shard filters applied with their reasons counted, the data card, and new filter values that
rewrite the shards without measuring again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data_schemas import ProjectConfig, read_records
from data_schemas.quality import ClipQuality
from data_schemas.shard import ShardSample
from data_schemas.workspace import Workspace
from preprocess.synthetic import SyntheticSpec, make_synthetic_video
from tests.helpers.cli import cli_env, task_states


@pytest.mark.slow
def test_filters_leave_out_clips_by_their_measures(tmp_path, prefect_api):
    from flows.preprocess import preprocess

    folder, workspace = tmp_path / "in", tmp_path / "ws"
    for name, persons in (("pair", 2), ("trio", 3), ("alone", 1)):
        make_synthetic_video(
            SyntheticSpec(width=128, height=96, num_frames=30, num_persons=persons, seed=persons), folder, name
        )
    truth = {"pose": {"models": "truth"}, "segment": {"models": "truth"}}
    summary = preprocess(folder, workspace, ProjectConfig.model_validate(truth))  # default filters: two or more persons

    rows = {r.clip_id: r for r in read_records(Workspace(workspace).quality_manifest, ClipQuality)}
    assert sorted(r.num_visible_persons for r in rows.values()) == [1, 2, 3]
    (alone,) = [i for i, r in rows.items() if r.num_visible_persons == 1]
    index = read_records(Workspace(workspace).shards_index, ShardSample)
    assert {s.key for s in index} == set(rows) - {alone}
    assert (summary.num_samples, summary.num_left_out, summary.left_out) == (2, 1, {"min_persons": 1})
    assert summary.first_sample_after is not None  # written as clips finished
    card = Workspace(workspace).data_card.read_text()
    assert "| min_persons | 1 |" in card and (Workspace(workspace).data_card_figures / "motion.png").is_file()

    # The card drawn from the same rows and filters is kept; one drawn from other inputs, or
    # missing a figure, is drawn again.
    from preprocess.data_card import write_data_card

    ws, filters = Workspace(workspace), ProjectConfig.model_validate(truth).shards.filters
    drawn = ws.data_card.stat().st_mtime_ns
    assert write_data_card(workspace, filters).stat().st_mtime_ns == drawn
    (ws.data_card_figures / "motion.png").unlink()
    write_data_card(workspace, filters)
    assert (ws.data_card_figures / "motion.png").is_file() and ws.data_card.read_text() == card

    # New filter values: the shards again, every measure from the cache.
    state = preprocess(
        folder,
        workspace,
        ProjectConfig.model_validate(truth | {"shards": {"filters": {"min_persons": 1, "max_persons": 2}}}),
        return_state=True,
    )
    second = state.result()
    states = task_states(state.state_details.flow_run_id, expected=len(rows) * 4 + 2)
    assert {n: s for n, s in states.items() if n.startswith("quality ")} == {f"quality {i}": "Cached" for i in rows}
    assert (second.num_samples, second.left_out) == (2, {"max_persons": 1})
    assert "| max_persons | 1 |" in ws.data_card.read_text()
    assert {s.key for s in read_records(Workspace(workspace).shards_index, ShardSample)} == {
        i for i, r in rows.items() if r.num_visible_persons <= 2
    }

    # The card again from the manifests, with other filters, through the command line.
    profile = tmp_path / "p.yaml"
    profile.write_text("shards:\n  filters:\n    min_persons: 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "data-card", "-w", str(workspace), "-c", str(profile)],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "| min_persons | 2 |" in Workspace(workspace).data_card.read_text()
