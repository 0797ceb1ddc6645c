"""Pretraining the tiny profile's base transformer as a plain image-to-video denoiser.

The real profile starts from Wan2.1-I2V, a pretrained denoiser, and MultiAnimate's LoRA
fine-tuning (model/train.py) only teaches it to follow poses and identities. The tiny
profile's seeded random transformer cannot denoise at all, so a LoRA fine-tuning of it spends
every step learning to denoise, and whether the conditions are used cannot be seen. Checks
that need a model that learns (bench/learning.py) therefore first train every weight of the
tiny transformer here, on the same clips, without any pose or identity condition, and
fine-tune from that base (``ModelConfig.tiny_transformer``).

    python -m model.pretrain --config RUN.json --out FOLDER [--steps 300]

Objective: model/train.py's flow matching (shifted sigmas, target eps - x0), unweighted, no
condition dropout. Single process. The folder is in diffusers layout (``config.json`` +
``diffusion_pytorch_model.safetensors``), written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

from data_schemas.train import TrainConfig
from data_schemas.workspace import Workspace
from model.components import build_tiny
from model.data import make_loader
from model.pipeline import MultiAnimatePipeline
from model.text_cache import EmbeddingCache
from model.text_encoder import profile_encoder_id
from model.train import NUM_TRAIN_TIMESTEPS, check_inputs, encode_frozen, training_sigmas


def pretrain_tiny_base(cfg: TrainConfig, out: Path, steps: int = 300, lr: float = 2e-3, batch_size: int = 2) -> dict:
    """Train the tiny transformer of ``cfg.model`` on ``cfg``'s shards and clip shape; write
    it to ``out``. Returns the mean loss of the first and last 20 steps and the time taken."""
    if cfg.model.profile != "tiny":
        raise ValueError("only the tiny profile has a base to pretrain (the real one is Wan2.1)")
    shards = check_inputs(cfg)
    cache = EmbeddingCache(
        Workspace(cfg.workspace).embeddings, profile_encoder_id(cfg.model.profile, cfg.model.wan_folder)
    )
    comps = build_tiny(cfg.model)  # no LoRA: the base itself is trained
    pipe = MultiAnimatePipeline(comps)
    transformer = comps.dit.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    loader_cfg = cfg.run_loader(len(shards), cfg.seed + 1)
    batches = iter(make_loader([str(s) for s in shards], loader_cfg, batch_size, 0, epoch_samples=steps * batch_size))
    sigmas, gen, device = training_sigmas(cfg.model.shift), torch.Generator().manual_seed(cfg.seed), torch.device("cpu")
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        frozen = encode_frozen(pipe, batch, cache.get_many(batch["caption"]), device, torch.float32)
        x0 = frozen.latents
        sigma = sigmas[torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)].view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        pred = comps.dit(
            (1 - sigma) * x0 + sigma * noise, frozen.y, sigma.view(-1) * NUM_TRAIN_TIMESTEPS, frozen.text, frozen.image
        )
        loss = (pred - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        losses.append(float(loss.detach()))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.eval().save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    head, tail = losses[: min(20, steps)], losses[-min(20, steps) :]
    return {
        "first_loss": sum(head) / len(head),
        "last_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="pretrain the tiny profile's base transformer (no pose conditions)")
    ap.add_argument("--config", type=Path, required=True, help="TrainConfig as JSON: workspace, shards, clip shape")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (diffusers layout)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    result = pretrain_tiny_base(TrainConfig.model_validate_json(args.config.read_text()), args.out, args.steps, args.lr)
    print(result)


if __name__ == "__main__":
    main()
