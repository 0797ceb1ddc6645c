"""Held-out evaluation on the tiny profile: scoring against generation, and a rerun with
nothing new against the first run.

A workspace of synthetic two-person clips, all held out; the evaluate flow generates each
clip (tiny profile, ``--steps`` denoising steps) and scores it with the tiny feature networks.
A warm-up run on another workspace first, so Prefect's one-off start and the networks' load
are not counted.

    python bench/evaluate.py [--clips 3] [--frames 25] [--size 256x192] [--steps 50]

Headline figures, printed last: score_vs_generate (the scoring of the clips, model.scoring's
plain function, over the jobs' generation seconds; goal <= 0.1) and rescore_vs_first (a rerun
that generates nothing and finds every score cached, over the first run; goal <= 0.05).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def held_out_workspace(root: Path, clips: int, frames: int, width: int, height: int) -> None:
    from data_schemas.config import ShardConfig
    from preprocess.shards import write_shards
    from tests.helpers.workspaces import make_workspace

    make_workspace(root, num_clips=clips, clips_per_source=1, num_frames=frames, width=width, height=height)
    write_shards(root, ShardConfig(val_fraction=1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", default="256x192")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (evaluate.steps default: 50)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    root = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    from flows.runtime import use_workspace

    use_workspace(root / "workspace")
    from data_schemas.config import ProjectConfig
    from data_schemas.evaluation import EvalConfig, Protocol
    from data_schemas.job import read_record
    from data_schemas.workspace import Workspace
    from flows.evaluate import evaluate
    from model import scoring

    protocol = Protocol(short_side=min(width, height))  # compared at the clips' own size
    config = ProjectConfig(
        pose={"models": "truth"}, evaluate=EvalConfig(protocol=protocol, steps=args.steps, short_side=None)
    )
    try:
        held_out_workspace(root / "warm", 1, 9, 64, 48)
        warm = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"steps": 1})})
        evaluate(root / "warm", "base", "warm", warm)  # Prefect's start, the model's and networks' load

        ws = Workspace(root / "workspace")
        held_out_workspace(ws.root, args.clips, args.frames, width, height)
        start = time.perf_counter()
        first = evaluate(ws.root, "base", "bench", config)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = evaluate(ws.root, "base", "bench", config)
        rerun_s = time.perf_counter() - start
        assert first.num_scored == args.clips and again.generated == [], (first, again)

        generate_s = sum(read_record(ws.root, job_id).seconds for job_id in first.generated)  # type: ignore[union-attr]
        start = time.perf_counter()
        for sample in scoring.held_out_clips(ws):
            record = next(r for j in first.generated if (r := read_record(ws.root, j)).spec.poses.stem == sample.key)  # type: ignore[union-attr]
            item = scoring.score_item_for(ws, sample, ws.resolve(record.outputs["video"]))
            assert item is not None
            scoring.score_item(item, protocol, config.evaluate.networks, config.pose)
        score_s = time.perf_counter() - start

        print(f"clips: {args.clips} x {args.frames} frames at {width}x{height}, {args.steps} steps, tiny profile")
        print(f"networks: {first.networks}")
        print(f"generate_s: {generate_s:.2f}")
        print(f"score_s: {score_s:.2f}")
        print(f"evaluate_first_s: {first_s:.2f}")
        print(f"evaluate_rerun_s: {rerun_s:.3f}")
        print(f"score_vs_generate: {score_s / generate_s:.3f}")
        print(f"rescore_vs_first: {rerun_s / first_s:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
