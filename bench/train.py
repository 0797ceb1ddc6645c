"""Training throughput of the tiny profile on the CPU: 1 vs 2 torchrun processes (gloo,
FSDP2), same per-process batch, on synthetic two-person shards.

    .venv/bin/python bench/train.py [--steps 12] [--frames 17] [--size 48x64]

Step times exclude the first two steps (start-up, first all-gathers). Prints its headline
figures last: ``steps_per_s_1proc`` and ``scaling_2proc`` (samples/s with 2 processes over
samples/s with 1), and the peak resident memory of a rank. On a GPU, bench/train_fullsize.py
measures full-size blocks under FSDP and activation checkpointing (tokens/s, MFU).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_schemas.config import ShardConfig
from data_schemas.train import TrainConfig
from model.train import launch_command
from tests.helpers.workspaces import make_train_workspace


def run(ws: Path, nproc: int, steps: int, frames: int, height: int, width: int) -> dict:
    cfg = TrainConfig(
        workspace=ws,
        run_name=f"bench-{nproc}",
        loader={"num_frames": frames, "height": height, "width": width},
        max_steps=steps,
        checkpoint_every=steps,
        num_workers=1,
        nproc=nproc,
    )
    path = ws / f"bench-{nproc}.json"
    path.write_text(cfg.model_dump_json())
    t0 = time.perf_counter()
    done = subprocess.run(launch_command(path, nproc), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-4000:])
    with (cfg.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))[2:]
    step_s = sum(float(r["step_time_s"]) for r in rows) / len(rows)
    return {
        "nproc": nproc,
        "wall_s": wall,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "samples_per_s": nproc / step_s,
        "peak_mem_gib": max(float(r["peak_mem_gib"]) for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="48x64", help="HxW of the samples")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        shards = ShardConfig(val_fraction=0.0, target_shard_bytes=100_000)
        make_train_workspace(ws, shards, num_clips=8, clips_per_source=1, num_frames=40)
        results = [run(ws, n, args.steps, args.frames, height, width) for n in (1, 2)]
    for r in results:
        print(
            f"{r['nproc']} process(es): {r['step_s']:.3f} s/step, {r['samples_per_s']:.3f} samples/s, "
            f"peak {r['peak_mem_gib']:.2f} GiB per rank, run {r['wall_s']:.1f} s"
        )
    print(f"peak_mem_gib_per_rank: {max(r['peak_mem_gib'] for r in results):.2f}")
    print(f"steps_per_s_1proc: {results[0]['steps_per_s']:.3f}")
    print(f"scaling_2proc: {results[1]['samples_per_s'] / results[0]['samples_per_s']:.3f}")


if __name__ == "__main__":
    main()
