"""The real path on a GPU host, in one command (under 5 minutes on one GPU):

1. the test suites of the real path on CUDA: ``tests/model/test_real_path.py`` (the tiny profile
   with a bf16 base: one AdamW step changes every fp32 trained tensor; per-rank sharded
   loading), ``tests/flows/test_real_path_e2e.py`` (random weights of the real architecture: weights,
   preprocessing, embeddings, 2 training steps under NCCL with a killed rank and a resume,
   guided generation), and the ``gpu`` tests of ``tests/model/test_pipeline.py`` (each offload mode
   gives the no-offload video and leaves no hooks);
2. generation on the real-architecture profile (bf16 base) with each offload mode: seconds
   and peak GPU memory, the LoRA merged;
3. DWPose on onnxruntime's CUDA provider (tiny models of the real I/O signatures);
4. ``multianimate preprocess --gpus N`` on every visible GPU (needs the 'gpu' extra's dask-cuda).

    python bench/gpu_smoke.py [--weights FOLDER] [--frames 33] [--height 480] [--width 832]

Prints one ``name: value`` line per figure at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_tests() -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "tests/model/test_real_path.py",
        "tests/flows/test_real_path_e2e.py",
        "tests/model/test_pipeline.py",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print("\n".join(done.stdout.splitlines()[-15:]))
    return done.returncode


def offload_figures(profile: Path, frames: int, height: int, width: int) -> dict[str, str]:
    import torch

    from data_schemas import load_config
    from model.components import build_components
    from model.pipeline import Conditions, MultiAnimatePipeline, SamplingConfig

    model = load_config(profile).model
    comps = build_components(model)
    comps.dit.merge_lora()  # once: every mode samples the same weights (unmerging a bf16 base rounds it)
    g = np.random.default_rng(0)
    dim = comps.dit.transformer.config.text_dim
    labels = np.zeros((frames, height, width), np.uint8)
    labels[:, :, width // 4 : width // 2], labels[:, :, width // 2 : 3 * width // 4] = 1, 2
    cond = Conditions(
        ref_image=g.integers(0, 256, (height, width, 3), dtype=np.uint8),
        pose=g.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        ref_pose=g.integers(0, 256, (height, width, 3), dtype=np.uint8),
        labels=labels,
        prompt_embeds=torch.randn(512, dim),
        negative_embeds=torch.randn(512, dim),
        num_persons=2,
    )
    figures, reference = {}, None
    for mode in ("none", "model", "group", "sequential"):
        pipe = MultiAnimatePipeline(comps)
        if mode == "none":
            comps.to("cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = pipe(cond, SamplingConfig(steps=2, guidance_scale=1.5, offload=mode, progress=False))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        if mode == "none":
            reference = out.frames.astype(np.int16)
            comps.to("cpu")
        diff = float(np.abs(out.frames.astype(np.int16) - reference).mean())
        print(f"offload {mode}: {seconds:.1f} s, peak {peak:.2f} GiB, mean |frame - no offload| {diff:.3f}")
        figures[f"generate_{mode}_peak_gib"] = f"{peak:.2f}"
        figures[f"generate_{mode}_s"] = f"{seconds:.1f}"
    return figures


def dwpose_figures() -> dict[str, str]:
    from preprocess.pose.dwpose import DWPose
    from preprocess.pose.onnx_models import build_tiny_models

    detector, pose = build_tiny_models(Path(tempfile.mkdtemp(prefix="dwpose-")))
    runner = DWPose(detector, pose, provider="auto")
    frames = np.random.default_rng(0).integers(0, 256, (16, 480, 832, 3), dtype=np.uint8)
    runner.estimate(frames[:2])
    t0 = time.perf_counter()
    runner.estimate(frames)
    return {
        "dwpose_provider": runner.provider,
        "dwpose_frames_per_s": f"{len(frames) / (time.perf_counter() - t0):.1f}",
    }


def local_gpus_figures() -> dict[str, str]:
    """``multianimate preprocess --gpus N`` (N: every visible GPU; dask-cuda's LocalCUDACluster)
    over 4 synthetic two-person videos with the tiny models: its exit code and seconds."""
    import torch

    from preprocess.synthetic import SyntheticSpec, make_synthetic_video
    from tests.helpers.cli import cli_env

    tmp = Path(tempfile.mkdtemp(prefix="gpus-"))
    for i in range(4):
        make_synthetic_video(
            SyntheticSpec(width=320, height=240, num_frames=50, num_persons=2, seed=i), tmp / "in", f"v{i}"
        )
    gpus = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "flows.cli", "preprocess", str(tmp / "in"), "-w", str(tmp / "ws"), "--gpus", str(gpus)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
    return {
        "local_gpus": str(gpus),
        "local_gpus_rc": str(done.returncode),
        "local_gpus_s": f"{time.perf_counter() - start:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="a --random-real-architecture folder (written when absent)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_smoke.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    from model.real_architecture import write_random_real_architecture

    figures = {"tests_rc": str(run_tests())}
    profile = write_random_real_architecture(args.weights or Path(tempfile.mkdtemp(prefix="real-arch-")) / "weights")
    figures |= offload_figures(profile, args.frames, args.height, args.width)
    figures |= dwpose_figures()
    figures |= local_gpus_figures()
    for name, value in figures.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
