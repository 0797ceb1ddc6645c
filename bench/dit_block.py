"""One full-size Wan2.1-14B DiT block with random weights: forward + backward at the real
token count (81 frames at 480x832 -> 21 x 30 x 52 = 32,760 tokens, 769 context tokens),
time and peak memory, for each attention backend that works here.

    python bench/dit_block.py                 # GPU: bf16, the real size
    python bench/dit_block.py --frames 9 --height 64 --width 64 --dim-scale 0.05   # CPU smoke run

Prints its headline figures last: ``block_fwd_bwd_ms``, ``block_peak_mem_gib``,
``block_tokens_per_s`` and ``block_tflops`` of the fastest backend (the baseline is
diffusers' native SDPA, measured in the same run: ``speedup_vs_native``).
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

from data_schemas.model import WAN_14B_DIT


def block_flops(tokens: int, context: int, dim: int, ffn: int) -> float:
    """Matmul FLOPs of one block, forward + backward (3x forward)."""
    linear = (
        2 * tokens * dim * dim * 4
        + 2 * tokens * dim * dim * 2
        + 2 * context * dim * dim * 4
        + 2 * tokens * dim * ffn * 2
    )
    attention = 4 * tokens * tokens * dim + 4 * tokens * context * dim
    return 3.0 * (linear + attention)


def run(backend: str, block, args, device, dtype, inputs) -> tuple[float, float]:
    hidden, context, temb, rope = inputs
    with attention_backend(backend):
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
            x = hidden.detach().requires_grad_(True)
            out = block(x, context, temb, rope)
            out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.iters * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--dim-scale", type=float, default=1.0, help="shrink heads and FFN (CPU smoke runs)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = WAN_14B_DIT
    heads = max(1, round(s.num_attention_heads * args.dim_scale))
    dim, ffn = heads * s.attention_head_dim, max(1, round(s.ffn_dim * args.dim_scale))
    torch.manual_seed(0)
    block = WanTransformerBlock(dim, ffn, heads, "rms_norm_across_heads", True, 1e-6, added_kv_proj_dim=dim).to(
        device, dtype
    )
    t, h, w = (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16
    tokens, context = t * h * w, 257 + 512
    rope = WanRotaryPosEmbed(s.attention_head_dim, (1, 2, 2), 1024).to(device)(
        torch.empty(1, 16, t, 2 * h, 2 * w, device=device)
    )
    inputs = (
        torch.randn(1, tokens, dim, device=device, dtype=dtype),
        torch.randn(1, context, dim, device=device, dtype=dtype),
        torch.randn(1, 6, dim, device=device, dtype=dtype),
        rope,
    )
    print(
        f"device {device} dtype {dtype}: {tokens} tokens, {context} context tokens, dim {dim}, ffn {ffn}, heads {heads}"
    )
    flops = block_flops(tokens, context, dim, ffn)
    results = {}
    for backend in ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3"):
        try:
            results[backend] = run(backend, block, args, device, dtype, inputs)
        except Exception as exc:  # a backend missing here (package, GPU generation) is skipped
            print(f"{backend}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
            continue
        ms, peak = results[backend]
        print(f"{backend}: {ms:.1f} ms fwd+bwd, peak {peak:.2f} GiB, {flops / ms / 1e9:.1f} TFLOP/s")
    best = min(results, key=lambda b: results[b][0])
    ms, peak = results[best]
    print(f"fastest backend: {best}")
    print(f"speedup_vs_native: {results['native'][0] / ms:.3f}")
    print(f"block_tflops: {flops / ms / 1e9:.1f}")
    print(f"block_tokens_per_s: {tokens / ms * 1e3:.0f}")
    print(f"block_peak_mem_gib: {peak:.2f}")
    print(f"block_fwd_bwd_ms: {ms:.1f}")


if __name__ == "__main__":
    main()
