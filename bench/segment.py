"""The streaming SAM2 tracker with the tiny model on the CPU: throughput and peak memory vs clip length.

Each clip length runs in a FRESH subprocess (so peaks don't mix) that builds the tiny model,
streams synthetic frames rendered on the fly chunk by chunk (the clip is never held whole),
prompts the persons with their ground-truth boxes at frame 0 and keeps only the uint8 label
map [T, H, W], as the real stage does. The child reports its peak RSS (ru_maxrss).

    python bench/segment.py [--lengths 100 400 1600] [--size 160x96] [--persons 2] [--no-prune]

Headline figures, printed last: frames_per_s (tracker steps per second on the longest clip,
rendering excluded) and peak_mem_1600_vs_100 (ratio of the two runs' peak RSS; a flat memory
profile gives ~1: the 1600-frame label map at 160x96 is only ~25 MB). ``--no-prune`` keeps
the session as transformers would (every frame's state), for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK = 50  # frames rendered at a time


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(length: int, width: int, height: int, persons: int, prune: bool) -> dict:
    """Track one clip of ``length`` frames; return its figures (run in its own process)."""
    import torch

    from preprocess.segment.identity import resolve_overlaps
    from preprocess.segment.sam2 import Sam2Tracker, build_tiny_sam2
    from preprocess.synthetic import SyntheticSpec, render_clip

    torch.set_grad_enabled(False)
    model, processor = build_tiny_sam2(seed=0)
    tracker = Sam2Tracker(model, processor)
    if not prune:
        tracker._prune = lambda t: None  # what an unpruned transformers session keeps
    rss_start = _rss_mb()
    labels = np.zeros((length, height, width), np.uint8)  # the only per-frame result kept
    step_s = 0.0
    for first in range(0, length, CHUNK):
        # Chunks are independent short clips (a scene cut every CHUNK frames): enough for
        # timing and memory, and nothing longer than a chunk is ever in memory.
        num = min(CHUNK, length - first)
        clip = render_clip(
            SyntheticSpec(width=width, height=height, num_frames=num, num_persons=persons, seed=first // CHUNK)
        )
        for i in range(num):
            new = {}
            if first + i == 0:
                for p in range(persons):
                    ys, xs = np.nonzero(clip.masks[0, p])
                    if len(xs):
                        new[p] = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            start = time.perf_counter()
            ids, logits = tracker.step(clip.frames[i], new)
            step_s += time.perf_counter() - start
            labels[first + i] = resolve_overlaps(logits) + 1
        del clip
    return {
        "length": length,
        "objects": len(ids),
        "step_s": step_s,
        "frames_per_s": length / step_s,
        "rss_start_mb": rss_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "label_map_mb": labels.nbytes / 2**20,
        "state": tracker.state_sizes(),
    }


def run_child(length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(length), "--size", args.size, "--persons", str(args.persons)]
    if args.no_prune:
        cmd.append("--no-prune")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child for {length} frames failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--size", default="160x96")
    parser.add_argument("--persons", type=int, default=2)
    parser.add_argument("--no-prune", action="store_true", help="keep every frame's state (comparison)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    if args.child is not None:
        print(json.dumps(child(args.child, width, height, args.persons, not args.no_prune)))
        return

    lengths = sorted(args.lengths)
    results = {n: run_child(n, args) for n in lengths}
    print(
        f"tiny SAM2 on the CPU, {width}x{height} frames, {args.persons} persons, pruning {'off' if args.no_prune else 'on'}"
    )
    for n, r in results.items():
        print(
            f"frames {n:5d}: {r['frames_per_s']:6.1f} frames/s, peak RSS {r['peak_rss_mb']:7.1f} MB "
            f"(after model build {r['rss_start_mb']:.1f} MB, label map {r['label_map_mb']:.1f} MB), "
            f"session: non-cond outputs {r['state']['non_cond_outputs']}, stored frames {r['state']['processed_frames']}"
        )
    longest = results[lengths[-1]]
    print(f"frames_per_s: {longest['frames_per_s']:.1f}")
    if 100 in results and 1600 in results:
        print(f"peak_mem_1600_vs_100: {results[1600]['peak_rss_mb'] / results[100]['peak_rss_mb']:.3f}")
    else:
        print(
            f"peak_mem_{lengths[-1]}_vs_{lengths[0]}: {longest['peak_rss_mb'] / results[lengths[0]]['peak_rss_mb']:.3f}"
        )


if __name__ == "__main__":
    main()
