"""Held-out figures during training (``TrainConfig.eval_every``): the flow-matching loss of a
few clips of the validation split (sources never trained on) at fixed noise levels and fixed
noise, with every condition on (``val_loss``) and with the pose conditions off
(``val_loss_pose_off``). The same clips, noise and levels at every evaluation, so the figures
compare across steps and runs; ``val_pose_gain`` (pose-off over pose-on, minus 1) says how
much the pose conditions help on clips the run never saw.

The loss is unweighted (every level counts alike) with the inference identifier channels, as
the model is used. Under FSDP2 every rank must run the same forwards: each rank takes clips
``rank, rank + world, ...`` (padded with weight-0 repeats) and the sums are all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_schemas.train import TrainConfig
from model.conditions import inference_channels, stack_channels

# Of the 1000 training sigmas (model/train.training_sigmas): four levels spread over the schedule.
SIGMA_INDICES = (125, 375, 625, 875)


def eval_noise(clip: int, level: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of held-out clip ``clip`` at level ``level`` (CPU, float32)."""
    seed = int(np.random.SeedSequence([clip, level, 7]).generate_state(1)[0])
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


@dataclass
class HeldOut:
    """One rank's share of the held-out clips, encoded once."""

    clips: list[int]  # index of each item among the held-out clips (its noise seed)
    weights: list[float]  # 0 for the padding repeats
    frozen: list  # model.train.Frozen per item
    batches: list[dict]  # the loader's samples, batch dimension 1


def held_out_samples(cfg: TrainConfig, shards: list[Path]) -> list[dict]:
    """The first ``eval_clips`` samples of the held-out shards, read in order, uncropped, at the
    run's clip shape and its largest stride (the same samples on every rank and every run)."""
    from model.data import make_dataset

    loader = cfg.loader.model_copy(
        update={"crop_fraction": 0.0, "shuffle_buffer": 0, "min_stride": cfg.loader.max_stride, "seed": 0}
    )
    samples = []
    for sample in make_dataset([str(s) for s in shards], loader, rank=0, world_size=1):
        samples.append(sample)
        if len(samples) == cfg.eval_clips:
            break
    if not samples:
        raise ValueError(
            f"eval_every is set, but the held-out shards {', '.join(map(str, shards))} gave no usable sample "
            f"at the run's clip shape ({cfg.loader.num_frames} frames)"
        )
    return samples


def share_of(samples: list[dict], rank: int, world: int) -> tuple[list[int], list[float]]:
    """Clip indices and weights of ``rank``: every rank runs the same number of forwards."""
    per_rank = math.ceil(len(samples) / world)
    mine = list(range(rank, len(samples), world))
    pad = per_rank - len(mine)
    return mine + [mine[0] if mine else 0] * pad, [1.0] * len(mine) + [0.0] * pad


def prepare_held_out(
    cfg: TrainConfig, shards: list[Path], pipe, cache, device, dtype, rank: int, world: int
) -> HeldOut:
    """This rank's share of the held-out clips, through the frozen encoders once."""
    from model.data import collate_samples
    from model.train import encode_frozen

    samples = held_out_samples(cfg, shards)
    clips, weights = share_of(samples, rank, world)
    batches = [collate_samples([samples[i]]) for i in clips]
    frozen = [encode_frozen(pipe, b, cache.get_many(b["caption"]), device, dtype) for b in batches]
    return HeldOut(clips, weights, frozen, batches)


@torch.no_grad()
def held_out_losses(model, label_pool: int, held: HeldOut, sigmas: torch.Tensor, device) -> dict[str, float]:
    """``val_loss``, ``val_loss_pose_off`` and ``val_pose_gain`` over every rank's items."""
    from model.train import NUM_TRAIN_TIMESTEPS

    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, loss without poses, weight
    for clip, weight, frozen, batch in zip(held.clips, held.weights, held.frozen, held.batches):
        x0 = frozen.latents
        channels = stack_channels([inference_channels(int(batch["num_persons"][0]), label_pool)]).to(device)
        for level in SIGMA_INDICES:
            sigma = sigmas[level].to(device, x0.dtype)
            noise = eval_noise(clip, level, x0.shape).to(device, x0.dtype)
            x_t = (1 - sigma) * x0 + sigma * noise
            timestep = (sigmas[level : level + 1] * NUM_TRAIN_TIMESTEPS).to(device, x0.dtype)
            target = (noise - x0).float()
            for slot, keep in ((0, 1.0), (1, 0.0)):
                pred = model(
                    x_t,
                    frozen.y,
                    timestep,
                    frozen.text,
                    frozen.image,
                    batch["pose"].to(device),
                    batch["labels"].to(device),
                    channels,
                    batch["ref_pose"].to(device),
                    torch.full((1, 1, 1, 1, 1), keep, device=device, dtype=x0.dtype),
                )
                sums[slot] += weight * float((pred.float() - target).square().mean())
        sums[2] += weight * len(SIGMA_INDICES)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, blind = float(sums[0] / sums[2]), float(sums[1] / sums[2])
    return {"val_loss": loss, "val_loss_pose_off": blind, "val_pose_gain": blind / loss - 1.0}
