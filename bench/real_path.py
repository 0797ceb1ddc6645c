"""The real path on the real-architecture profile, on the CPU.

Figures (printed last, one ``name: value`` per line):

* ``dit_load_rss_per_rank_vs_dit_bytes``: the host memory that building the DiT for
  training adds on the busiest of 2 torchrun ranks (gloo, FSDP2), over the DiT base's
  bytes. The same work twice, in separate process pairs: ``whole`` (every rank loads the
  whole base with ``from_pretrained``, then FSDP2 shards it: the old path) and ``sharded``
  (the base on the meta device, each rank reading only its rows: model/loading.py). Both
  include LoRA, the condition encoders and the released-layout checkpoint. On a CPU the
  shard itself lives in host RAM, so the floor is 1 / ranks = 0.5; on GPUs it is ~0.
  Measured as the rise of each rank's resident peak (VmHWM, reset before the build).
* ``merged_step_speedup``: one guided denoiser step (2 forwards, 5 frames at 240x416) with
  LoRA unmerged over the same step with LoRA merged into the bf16 base, one process (rank
  128 against width 5120: LoRA is a few per cent of a block's matmuls).
* ``speedup_vs_seed``: the training loader against the seed's (bench/loader.py, rerun here
  after the pose-scale change; its own figures are printed above).

    python bench/real_path.py [--weights FOLDER] [--skip-loader]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_worker(profile: Path, mode: str) -> None:
    """One rank: build the DiT for training the ``mode`` way and print what it added."""
    import torch
    import torch.distributed as dist

    from data_schemas import load_config
    from model.components import attach_trained, load_real_dit
    from model.loading import base_bytes, load_sharded
    from model.train import peak_rss_bytes, peak_rss_reset, shard_denoiser

    cfg = load_config(profile).model
    dist.init_process_group("gloo")
    gc.collect()
    dist.barrier()
    before = peak_rss_reset()
    torch.manual_seed(0)
    dit = load_real_dit(cfg, on_meta=(mode == "sharded"))
    attach_trained(dit, cfg)
    dit.set_trainable()
    model = shard_denoiser(dit, cfg.torch_dtype)
    if mode == "sharded":
        load_sharded(model, cfg.wan_folder / "transformer", "dit.transformer.", torch.device("cpu"))
    gc.collect()
    added = peak_rss_bytes() - before
    dit_bytes = base_bytes(dit.transformer)
    sys.stdout.write(
        f"rank {dist.get_rank()} mode={mode} rss_added={added} dit_bytes={dit_bytes}\n"
    )  # one write: ranks share stdout
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def measure_load(profile: Path, mode: str) -> tuple[float, int]:
    """(the busiest rank's added host memory / the DiT's bytes, the DiT's bytes)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            __file__,
            "--worker",
            mode,
            "--profile",
            str(profile),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rows = re.findall(r"rank \d mode=\w+ rss_added=(-?\d+) dit_bytes=(\d+)", out.stdout)
    if out.returncode or len(rows) != 2:
        raise RuntimeError(f"{mode} load failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    dit_bytes = int(rows[0][1])
    return max(int(added) for added, _ in rows) / dit_bytes, dit_bytes


def measure_merged_step(profile: Path) -> tuple[float, float]:
    """Seconds of one guided denoiser step, (unmerged, merged), on the real-architecture DiT."""
    from data_schemas import load_config
    from model.components import build_components
    from model.pipeline import MultiAnimatePipeline, time_denoiser_step

    pipe = MultiAnimatePipeline(build_components(load_config(profile).model))
    size = dict(num_frames=5, height=240, width=416)  # 780 tokens: the full 32,760 would take hours on a CPU
    return time_denoiser_step(pipe, merged=False, **size), time_denoiser_step(pipe, merged=True, **size)


def loader_speedup() -> float:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loader.py")], capture_output=True, text=True, check=True, cwd=ROOT
    )
    print(out.stdout.rstrip())
    return float(re.search(r"^speedup_vs_seed: ([0-9.]+)$", out.stdout, re.MULTILINE).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="a --random-real-architecture folder (written here when absent)")
    parser.add_argument("--skip-loader", action="store_true", help="do not rerun bench/loader.py")
    parser.add_argument("--worker", choices=["whole", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        load_worker(args.profile, args.worker)
        sys.stdout.flush()
        os._exit(0)  # gloo workers occasionally abort at interpreter exit after a correct run (model/train.py)

    from model.real_architecture import write_random_real_architecture

    folder = args.weights or Path(tempfile.mkdtemp(prefix="real-arch-")) / "weights"
    t0 = time.perf_counter()
    profile = write_random_real_architecture(folder)
    print(f"real-architecture weights: {folder} ({time.perf_counter() - t0:.0f} s)")
    ratios = {}
    for mode in ("whole", "sharded"):
        ratios[mode], dit_bytes = measure_load(profile, mode)
        print(
            f"{mode}: the busiest rank's host memory rose by {ratios[mode]:.3f} x the DiT's {dit_bytes / 2**30:.2f} GiB"
        )
    unmerged, merged = measure_merged_step(profile)
    print(f"guided denoiser step: unmerged {unmerged:.3f} s, merged {merged:.3f} s")
    speedup = None if args.skip_loader else loader_speedup()
    print(f"dit_load_rss_per_rank_whole_vs_dit_bytes: {ratios['whole']:.3f}")
    print(f"dit_load_rss_per_rank_vs_dit_bytes: {ratios['sharded']:.3f}")
    print(f"merged_step_speedup: {unmerged / merged:.3f}")
    if speedup is not None:
        print(f"speedup_vs_seed: {speedup:.2f}")


if __name__ == "__main__":
    main()
