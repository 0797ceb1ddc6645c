"""Do the conditions pay during fine-tuning? The learning check's data and base
(bench/learning.py), then a fine-tuning loop in which every step's loss is also computed
without the pose and identity conditions, on the same batch, noise and timesteps:

    gain = 1 - loss with conditions / loss without       (per window of 25 steps)

A model that learns to use the driving poses shows a growing gain long before its samples
do, so this measures the speed of that learning in a minute or two.

    .venv/bin/python bench/condition_gain.py [--steps 150] [--lr 1e-3] [--train encoders|lora|all]

``--train``: the condition encoders only (base and LoRA frozen), encoders + LoRA (as
model/train.py), or encoders + the whole transformer. Prints ``condition_gain`` (the last
window's) last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import FRAMES, HEIGHT, STRIDE, WIDTH, prepare
from data_schemas.model import ModelConfig
from data_schemas.train import TrainConfig
from data_schemas.workspace import Workspace
from model.components import build_components
from model.data import LoaderConfig, make_loader
from model.pipeline import MultiAnimatePipeline
from model.text_cache import EmbeddingCache
from model.text_encoder import profile_encoder_id
from model.train import (
    ConditionedDenoiser,
    encode_frozen,
    step_generators,
    training_loss,
    training_sigmas,
    training_weights,
)

WINDOW = 25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--train", choices=("encoders", "lora", "all"), default="encoders")
    args = ap.parse_args()
    if args.steps < WINDOW:
        ap.error(f"--steps must be at least {WINDOW} (one window)")
    with tempfile.TemporaryDirectory() as tmp:
        ws, _, base = prepare(Path(tmp))
        torch.manual_seed(0)
        comps = build_components(ModelConfig(tiny_transformer=base))
        dit = comps.dit
        dit.set_trainable()
        for name, p in dit.named_parameters():
            is_lora, is_base = ".lora_" in name, name.startswith("transformer.") and ".lora_" not in name
            p.requires_grad_(
                {"encoders": not is_lora and not is_base, "lora": not is_base, "all": not is_lora}[args.train]
            )
        dit.train()
        pipe, model = MultiAnimatePipeline(comps), ConditionedDenoiser(dit)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        shape = {"num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "max_stride": STRIDE, "min_stride": STRIDE}
        with_conditions = TrainConfig(workspace=ws, loader=shape, image_dropout=0.0, pose_dropout=0.0)
        without = with_conditions.model_copy(update={"pose_condition": False})
        cache = EmbeddingCache(Workspace(ws).embeddings, profile_encoder_id("tiny"))
        loader_cfg = LoaderConfig(
            num_frames=FRAMES,
            height=HEIGHT,
            width=WIDTH,
            max_stride=STRIDE,
            min_stride=STRIDE,
            resampled=True,
            seed=0,
            shuffle_buffer=64,
        )
        shards = sorted(str(p) for p in Workspace(ws).shards.glob("*.tar"))
        batches = iter(make_loader(shards, loader_cfg, args.batch_size, 0, epoch_samples=args.steps * args.batch_size))
        shift = comps.config.shift
        sigmas, weights = training_sigmas(shift), training_weights(shift)
        losses = []
        for step in range(args.steps):
            batch = next(batches)
            frozen = encode_frozen(pipe, batch, cache.get_many(batch["caption"]), torch.device("cpu"), torch.float32)
            gen, rng = step_generators(0, 0, step, 0)
            loss = training_loss(model, dit.label_pool, frozen, batch, with_conditions, sigmas, weights, gen, rng)
            with torch.no_grad():
                gen, rng = step_generators(0, 0, step, 0)  # the same draws
                blind = training_loss(model, dit.label_pool, frozen, batch, without, sigmas, weights, gen, rng)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append((loss.item(), blind.item()))
            if (step + 1) % WINDOW == 0:
                window = np.array(losses[-WINDOW:])
                gain = 1 - window[:, 0].sum() / window[:, 1].sum()
                print(
                    f"step {step + 1}: loss {window[:, 0].mean():.4f} with conditions, {window[:, 1].mean():.4f} without, gain {gain:.3f}",
                    flush=True,
                )
    print(f"condition_gain: {gain:.3f}")


if __name__ == "__main__":
    main()
