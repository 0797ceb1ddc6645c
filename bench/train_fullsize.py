"""Full-size training step on a GPU: Wan2.1-14B DiT blocks with random weights, LoRA rank 128
and the three condition encoders, wrapped exactly as model/train.py wraps them (FSDP2 per
block and at the root, bf16 compute, fp32 reduction) with activation checkpointing, at the
real token count (81 frames at 480x832 -> 32,760 tokens).

    torchrun --standalone --nproc-per-node 1 bench/train_fullsize.py [--layers 1 3] [--no-ac]

A step (forward, an MSE loss, backward, AdamW over LoRA and the encoders) is timed with L1 and L2
blocks; the difference per block is one full-size block's share, so the encoders, the
embeddings and the optimizer drop out. FLOPs of a block (bench/dit_block.py's count): a
LoRA step does the forward and the input-gradient half of the backward (the frozen base
weights get no gradients): model FLOPs = 2x forward; activation checkpointing recomputes
the forward once more (hardware FLOPs = 3x forward; 2x without it). The baseline is the
bf16 matrix rate of this GPU measured in the same run (8192^3 products).

Measured on one H200 (bf16 matmul 781 TFLOP/s), 81 x 480 x 832, one process:

    activation checkpointing   ms/block-step   tokens/s   MFU     GiB per block   peak (3 blocks)
    on                         344             95,149     0.314   3.3             35.5
    off                        252             129,906    0.425   11.0            51.3

The rest of the 1-block run's 29 GiB (condition encoders at full resolution, embeddings,
optimizer) is paid once, not per block.

Prints its headline figures last: ``block_tokens_per_s``, ``block_mfu`` (model FLOPs over
the measured matrix rate), ``block_hfu`` and ``peak_mem_gib`` (of the L2 run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_block import block_flops
from data_schemas.model import WAN_14B_DIT
from model.dit import MultiAnimateDiT, build_transformer
from model.train import shard_denoiser


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def step_time(layers: int, args, device: torch.device) -> tuple[float, float]:
    """Seconds per training step and peak GiB with ``layers`` full-size blocks."""
    torch.manual_seed(0)
    with device:
        dit = MultiAnimateDiT(build_transformer(WAN_14B_DIT.model_copy(update={"num_layers": layers})), label_pool=8)
        dit.add_lora(128, 128.0)
    dit.to(device)  # buffers made from CPU arrays (rotary tables) ignore the device context
    trainable = dit.set_trainable()
    if args.ac:
        dit.transformer.enable_gradient_checkpointing()
    model = shard_denoiser(dit, torch.bfloat16)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    T, H, W = args.frames, args.height, args.width
    t, h, w = (T - 1) // 4 + 1, H // 8, W // 8
    bf = dict(device=device, dtype=torch.bfloat16)
    inputs = (
        torch.randn(1, 16, t, h, w, **bf),
        torch.randn(1, 20, t, h, w, **bf),
        torch.full((1,), 500.0, **bf),
        torch.randn(1, 512, WAN_14B_DIT.text_dim, **bf),
        torch.randn(1, 257, WAN_14B_DIT.image_dim, **bf),
        torch.randint(0, 256, (1, 3, T, H, W), device=device, dtype=torch.uint8),
        torch.randint(0, 3, (1, T, H, W), device=device),
        torch.tensor([[0, 3, 5]], device=device),
        torch.randint(0, 256, (1, 3, H, W), device=device, dtype=torch.uint8),
        torch.ones(1, 1, 1, 1, 1, **bf),
    )
    target = torch.randn(1, 16, t, h, w, **bf)
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
        loss = (model(*inputs).float() - target.float()).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, dit, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs=2, default=(1, 3), metavar=("L1", "L2"))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--no-ac", dest="ac", action="store_false", help="without activation checkpointing")
    args = ap.parse_args()
    # on CPUs (gloo) only as a smoke run at a small size: bench/train.py measures the tiny profile there
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    s = WAN_14B_DIT
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
    forward = block_flops(tokens, 257 + 512, s.inner_dim, s.ffn_dim) / 3
    peak_rate = matmul_tflops(device, n=8192 if cuda else 1024)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"{name}, world {dist.get_world_size()}: {tokens} tokens, "
        f"activation checkpointing {args.ac}; bf16 matmul {peak_rate:.0f} TFLOP/s"
    )
    (l1, l2), runs = args.layers, {}
    for layers in (l1, l2):
        runs[layers] = step_time(layers, args, device)
        print(f"{layers} block(s): {runs[layers][0] * 1e3:.0f} ms/step, peak {runs[layers][1]:.1f} GiB", flush=True)
    block_s = (runs[l2][0] - runs[l1][0]) / (l2 - l1)
    print(f"block_step_ms: {block_s * 1e3:.1f}")
    print(f"matmul_tflops: {peak_rate:.0f}")
    print(f"peak_mem_gib: {runs[l2][1]:.2f}")
    recompute = 1 if args.ac else 0
    print(f"block_hfu: {(2 + recompute) * forward / block_s / 1e12 / peak_rate:.3f}")
    print(f"block_mfu: {2 * forward / block_s / 1e12 / peak_rate:.3f}")
    print(f"block_tokens_per_s: {tokens / block_s:.0f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
