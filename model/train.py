"""LoRA fine-tuning of MultiAnimate: one process per device, started by torchrun.

    torchrun --standalone --nproc-per-node N -m model.train --config RUN.json
    python -m model.train --config RUN.json --dry-run      # check inputs and build, no training

``RUN.json`` is a ``data_schemas.train.TrainConfig``; ``launch_command`` builds this line for
the README, the Prefect task and the tests alike. Multi-node: run the same line on every
node with ``--nnodes M --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` in place
of ``--standalone``.

What is trained (spec D.5): LoRA of the DiT and the three condition encoders; the DiT base,
the VAE and the CLIP tower are frozen; prompt embeddings come from the cache
(model/text_cache.py), never from the text encoder. Latents and CLIP features are computed
on the fly from the uint8 batch.

Objective (spec C.3): sigma from the 1000-step schedule shifted by ``model.shift`` at a
uniformly drawn index; x_t = (1 - sigma) x0 + sigma eps; target eps - x0; MSE weighted by
the Gaussian timestep weight. Condition dropout: p=0.05 zeroes pose + identity tokens and
the reference-pose features; independently p=0.10 zeroes the CLIP features and ``y`` (the
reference-pose features are still added to the zeroed y).

Parallelism: FSDP2 (``fully_shard``) per transformer block, per condition encoder and at
the root, on NCCL with GPUs and on gloo with CPUs, so the same code runs in the tests.

Exact resumption: every random draw of a step comes from generators seeded by (seed, rank,
step, micro-step), and the loader's stream is cut into epochs of ``checkpoint_every`` steps
whose content depends only on (seed, epoch, rank, worker). A checkpoint at a step boundary
(model, optimizer, scheduler, step) therefore determines the rest of the run.

Run folder: ``config.json``, ``metrics.csv`` (step, loss, lr, grad norm, step time,
samples/s, peak memory), ``checkpoints/step-NNNNNNN/`` (torch.distributed.checkpoint, with
``trainer.json``; renamed into place when complete, model/checkpoint.py), ``final/`` (our
safetensors format), ``loss_curve.png``, ``pids/rank<r>.pid``.

One writer per run folder (``claim_run_folder``; model/run_folder.py): torchrun starts every
rank in a session of its own, so killing the launcher's process group does not reach the
ranks. Each rank therefore dies with its parent (PR_SET_PDEATHSIG) and with the launcher that
owns the folder (a watchdog thread), holds a lock on its pid file (pid and start time) for its
life, and a launcher stops the live ranks a dead launcher left before it starts new ones.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from data_schemas.atomic import atomic_path
from data_schemas.batch import video_to_model_range
from data_schemas.shard import hold_for_reading
from data_schemas.train import TrainConfig
from data_schemas.workspace import Workspace
from model.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    publish_checkpoint,
    remove_checkpoint_leftovers,
    save_adapter_tensors,
    save_checkpoint_files,
    temp_checkpoint_dir,
)
from model.components import Components, build_components
from model.conditions import stack_channels, training_channels
from model.data import make_loader
from model.held_out import held_out_losses, prepare_held_out
from model.loading import base_bytes, check_files, load_sharded
from model.pipeline import MultiAnimatePipeline, sampling_sigmas
from model.run_folder import LAUNCHER_ENV, die_with_launcher, hold_rank, own_run_folder
from model.text_cache import EmbeddingCache
from model.text_encoder import profile_encoder_id

NUM_TRAIN_TIMESTEPS = 1000
FAULT_ENV = "MULTIANIMATE_FAULT_KILL"  # "RANK:STEP": that rank SIGKILLs itself once (resilience tests)
STALL_ENV = "MULTIANIMATE_FAULT_STALL"  # "STEP": after STEP steps and their checkpoint, every rank stops for good
FAILURE_PREFIX = (
    "multianimate-train-failure "  # a failed rank's last line: this prefix, then JSON (the launcher reads it)
)
METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "peak_mem_gib")
# Filled on the steps a held-out evaluation ran (TrainConfig.eval_every), empty on the others.
EVAL_FIELDS = ("val_loss", "val_loss_pose_off", "val_pose_gain")


def launch_command(config_path: Path, nproc: int) -> list[str]:
    """The one launch line (single node); see the module docstring for multi-node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "model.train",
        "--config",
        str(config_path),
    ]


# ---- the objective -------------------------------------------------------------------


def training_sigmas(shift: float) -> torch.Tensor:
    """The 1000 shifted training sigmas (the sampling schedule with N = 1000, no final 0)."""
    return sampling_sigmas(NUM_TRAIN_TIMESTEPS, shift)[:-1].float()


def training_weights(shift: float) -> torch.Tensor:
    """w(t) = exp(-2 ((t - 500) / 1000)^2) over the 1000 shifted timesteps, minus its minimum,
    rescaled so the 1000 weights sum to 1000 (spec C.3)."""
    t = training_sigmas(shift).double() * NUM_TRAIN_TIMESTEPS
    w = torch.exp(-2 * ((t - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    w = w - w.min()
    return (w * NUM_TRAIN_TIMESTEPS / w.sum()).float()


def seen_timestep_index(index: torch.Tensor, sigmas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The training index whose timestep is nearest to ``1000 sigma`` rounded to ``dtype``.
    The model sees the rounded timestep; the release noises and weights with the sigma of
    that nearest timestep (its scheduler looks the rounded value up), so in bf16 the three
    agree. The identity in fp32; ties go to the first (larger) timestep, as argmin does."""
    timesteps = sigmas.double() * NUM_TRAIN_TIMESTEPS
    seen = (sigmas[index] * NUM_TRAIN_TIMESTEPS).to(dtype).double()
    return (timesteps[None, :] - seen[:, None]).abs().argmin(dim=1)


def step_generators(seed: int, rank: int, step: int, micro: int) -> tuple[torch.Generator, random.Random]:
    """Every random draw of one micro-step, from (seed, rank, step, micro) alone."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0])), random.Random(int(state[1]))


@dataclass
class Frozen:
    """The frozen encoders' outputs for one batch."""

    latents: torch.Tensor  # [B, 16, t, h, w], normalised
    y: torch.Tensor  # [B, 20, t, h, w]
    image: torch.Tensor  # [B, L, image_dim]
    text: torch.Tensor  # [B, 512, text_dim]


@torch.no_grad()
def encode_frozen(
    pipe: MultiAnimatePipeline, batch: dict, text: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> Frozen:
    vae = pipe.c.vae
    video = video_to_model_range(batch["video"].to(device)).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    latents = (vae.encode(video).latent_dist.mode() - mean) / std
    T, H, W = video.shape[2:]
    refs = batch["ref_image"]
    ys = []
    for b in range(refs.shape[0]):  # diffusers' prepare_latents assumes one image per call
        ref = video_to_model_range(refs[b : b + 1].to(device))
        _, y = pipe.wan.prepare_latents(ref, 1, 16, H, W, T, dtype=dtype, device=device, latents=latents[b : b + 1])
        ys.append(y)
    images = [refs[b].permute(1, 2, 0).numpy() for b in range(refs.shape[0])]
    image = pipe.wan.encode_image(images, device=device)
    return Frozen(latents.to(dtype), torch.cat(ys).to(dtype), image.to(dtype), text.to(device, dtype))


class ConditionedDenoiser(torch.nn.Module):
    """The DiT and its condition encoders in ONE forward: FSDP2 gathers a root's parameters
    only when the root's forward runs, so the encoders cannot be called from outside it."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x_t, y, timestep, text, image, pose, labels, channels, ref_pose, keep_pose):
        dit = self.dit
        tokens = dit.condition_tokens(pose, labels, channels) * keep_pose
        ref_features = dit.ref_pose_guider(ref_pose) * keep_pose
        out = dit(x_t, y, timestep, text, image, tokens.to(x_t.dtype), ref_features.to(x_t.dtype))
        return out.clone()  # unpatchify returns a view; FSDP2 warns that in-place ops on it would skip hooks


def training_loss(
    model: ConditionedDenoiser,
    label_pool: int,
    frozen: Frozen,
    batch: dict,
    cfg: TrainConfig,
    sigmas: torch.Tensor,
    weights: torch.Tensor,
    gen: torch.Generator,
    rng: random.Random,
) -> torch.Tensor:
    """The weighted flow-matching loss of one micro-batch (module docstring)."""
    x0 = frozen.latents
    B, device = x0.shape[0], x0.device
    index = seen_timestep_index(torch.randint(0, NUM_TRAIN_TIMESTEPS, (B,), generator=gen), sigmas, x0.dtype)
    sigma = sigmas[index].view(B, 1, 1, 1, 1).to(device, x0.dtype)
    noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
    x_t = (1 - sigma) * x0 + sigma * noise
    target = noise - x0
    drop_pose = (torch.rand(B, generator=gen) < cfg.pose_dropout).to(device)
    drop_image = (torch.rand(B, generator=gen) < cfg.image_dropout).to(device)
    if not cfg.pose_condition:
        drop_pose = torch.ones_like(drop_pose)
    channels = stack_channels(_batch_channels(batch["num_persons"], label_pool, rng)).to(device)
    keep_pose = (~drop_pose).view(B, 1, 1, 1, 1).to(x0.dtype)
    keep_image = (~drop_image).view(B, 1, 1, 1, 1).to(x0.dtype)
    y = frozen.y * keep_image
    image = frozen.image * keep_image.view(B, 1, 1)
    timestep = (sigmas[index] * NUM_TRAIN_TIMESTEPS).to(device, x0.dtype)  # rounded from fp32, as the release
    pred = model(
        x_t,
        y,
        timestep,
        frozen.text,
        image,
        batch["pose"].to(device),
        batch["labels"].to(device),
        channels,
        batch["ref_pose"].to(device),
        keep_pose,
    )
    per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3, 4))
    return (per_sample * weights[index].to(device)).mean()


def _batch_channels(num_persons: torch.Tensor, pool: int, rng: random.Random) -> list[list[int]]:
    """Each sample draws K_max + 1 distinct channels (K_max: the batch's most persons); in a
    sample with fewer persons the extra ones meet all-zero one-hot channels, so they change
    nothing (conditions.py)."""
    k_max = max(1, int(num_persons.max()))
    return [training_channels(k_max, pool, rng) for _ in num_persons]


# ---- one writer per run folder (model/run_folder.py) ---------------------------------------


@contextlib.contextmanager
def claim_run_folder(run_dir: Path, rank: int) -> Iterator[None]:
    """A rank's hold on its run folder, taken before it writes anything there: started by our
    launcher (``LAUNCHER_ENV``), the launcher owns the folder; started by hand (torchrun, or in
    one process), rank 0 owns it. Every rank then holds its pid file (model/run_folder.py)."""
    with contextlib.ExitStack() as stack:
        if LAUNCHER_ENV not in os.environ:
            if rank == 0:
                stack.enter_context(own_run_folder(run_dir))
            _barrier()  # no rank writes before rank 0 owns the folder (if it cannot, torchrun stops them all)
        stack.enter_context(hold_rank(run_dir, rank))
        yield


def failure_line(exc: BaseException) -> str:
    """A failed rank's last line: the root cause (DCP wraps every rank's error in its own
    exception; the OSError of a full disk sits under it) as JSON, for the launcher to report."""
    cause = exc
    failures = getattr(cause, "failures", None)  # dcp.api.CheckpointException
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))[0]
    chained, seen = cause, set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        if isinstance(chained, OSError) and chained.errno:
            cause = chained
            break
        chained = chained.__cause__ or chained.__context__
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "error": f"{type(cause).__name__}: {cause}".splitlines()[0],
        "errno": getattr(cause, "errno", None),
    }
    return FAILURE_PREFIX + json.dumps(record)


def disk_full(errno_value: int | None) -> bool:
    return errno_value in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ---- the run -------------------------------------------------------------------------


def _setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shard_denoiser(dit: torch.nn.Module, dtype: torch.dtype) -> ConditionedDenoiser:
    """FSDP2 per transformer block and at the root (compute in ``dtype``, gradients reduced in
    fp32); unsharded when no process group runs."""
    model = ConditionedDenoiser(dit)
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # Blocks take their inputs as the root made them. If FSDP cast them (the fp32 rotary
    # tables to bf16), torch < 2.14 would skip that cast when activation checkpointing
    # recomputes a block, and the recomputed tensors' dtypes would not match (seen on a GPU).
    block_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in dit.transformer.blocks:
        fully_shard(block, mp_policy=block_mp)
    return fully_shard(model, mp_policy=mp)


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trained parameters: LoRA at ``lr``, the condition encoders at ``encoder_lr``."""
    lora, encoders = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if ".lora_" in name else encoders).append(p)
    return [{"params": lora, "lr": cfg.lr}, {"params": encoders, "lr": cfg.encoder_lr or cfg.lr}]


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, rank: int, keep: int) -> None:
    """Every rank writes its part under a temporary folder; rank 0 renames it into place when
    all are whole. A failed save (a full disk) removes its temporary folder and raises, the
    previous checkpoint untouched; a killed one leaves it for the next owner to remove."""
    final = checkpoint_dir(run_dir, step)
    tmp = temp_checkpoint_dir(final)
    if rank == 0 and tmp.exists():
        remove_checkpoint_leftovers(run_dir)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    try:
        save_checkpoint_files({"model": model_sd, "optim": optim_sd}, tmp, rank, step)
    except BaseException:  # every rank fails: DCP gathers each rank's outcome
        if rank == 0:
            remove_checkpoint_leftovers(run_dir)  # give back the space the partial save took
        raise
    if rank == 0:
        publish_checkpoint(tmp, final, {"step": step, "scheduler": scheduler.state_dict()}, keep)
    _barrier()


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    trainer = load_checkpoint(path, state)  # refuses files that would run code
    # strict=False: the frozen base weights are not in the checkpoint (the load above already
    # failed if any trained tensor was missing from it)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    scheduler.load_state_dict(trainer["scheduler"])
    return int(trainer["step"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _metrics_writer(run_dir: Path, resume_step: int):
    """Append to metrics.csv, first dropping rows past the resumed step (a killed attempt
    may have logged steps that are now redone)."""
    path = run_dir / "metrics.csv"
    rows = []
    if path.is_file():
        with path.open() as fh:
            rows = [r for r in csv.DictReader(fh) if _whole_row(r) and int(r["step"]) <= resume_step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, METRIC_FIELDS + EVAL_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fh = path.open("a", newline="")
    return fh, csv.DictWriter(fh, METRIC_FIELDS + EVAL_FIELDS)


def _whole_row(row: dict) -> bool:
    """False for the torn last line a kill or a full disk may leave."""
    return all(row.get(f) not in (None, "") for f in METRIC_FIELDS) and row["step"].isdigit()


def write_loss_curve(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "loss_curve.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _maybe_fault(rank: int, step: int, run_dir: Path) -> None:
    if os.environ.get(STALL_ENV) == str(step):
        while True:
            time.sleep(60)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step = (int(v) for v in spec.split(":"))
    marker = run_dir / ".fault-fired"
    if rank == fault_rank and step == fault_step and not marker.exists():
        marker.write_text(f"rank {rank} killed itself at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def check_inputs(cfg: TrainConfig) -> list[Path]:
    """The shards of the run; ValueError naming what is missing (shards, weights)."""
    shards = sorted(cfg.workspace.glob(cfg.shards))
    if not shards:
        raise ValueError(f"no training shards match {cfg.workspace / cfg.shards} (run the preprocess flow first)")
    if cfg.eval_every and not eval_shards(cfg):
        raise ValueError(
            f"eval_every is set, but no held-out shards match {cfg.workspace / cfg.eval_shards} (preprocess with "
            "shards.val_fraction above 0, or leave eval_every unset)"
        )
    cfg.model.require_weights()
    return shards


def eval_shards(cfg: TrainConfig) -> list[Path]:
    return [Path(os.path.realpath(p)) for p in sorted(cfg.workspace.glob(cfg.eval_shards))]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Built:
    """The model of a run, ready to train, and what loading it cost."""

    comps: Components
    pipe: MultiAnimatePipeline
    model: torch.nn.Module  # the (FSDP2-sharded when distributed) ConditionedDenoiser
    dit_bytes: int  # the frozen DiT base's bytes in its dtype
    dit_read_bytes: int  # what this rank read of it from the weight files (0: built in code or whole)
    rss_added_bytes: int  # host memory this rank's peak grew by while building


def build_training_model(cfg: TrainConfig, device: torch.device, describe_only: bool = False) -> Built:
    """The model as training builds it: under torchrun, a real profile's DiT on the meta
    device, sharded by FSDP2, each rank reading only its rows of the weight files; LoRA and
    the condition encoders fp32 master weights, computed in ``cfg.compute_dtype``.
    ``describe_only``: the DiT base stays on the meta device, its files checked (headers) but
    not read, so a dry run of the 14B model needs no 28 GB."""
    dtype = cfg.compute_dtype
    sharded = dist.is_initialized()
    on_meta = (sharded or describe_only) and cfg.model.profile != "tiny"
    if not sharded and dtype != cfg.model.torch_dtype:
        raise ValueError(
            f"precision {cfg.precision!r} computes in {dtype} but the frozen base is {cfg.model.dtype}: "
            "without FSDP2 (one process, no torchrun) they must agree; use precision 'auto'"
        )
    rss0 = peak_rss_reset()
    torch.manual_seed(cfg.seed)  # LoRA's random initialisation: identical on every rank
    comps = build_components(cfg.model, dit_on_meta=on_meta)
    comps.vae.requires_grad_(False).to(device)
    comps.image_encoder.requires_grad_(False).to(device)
    if not on_meta:
        comps.dit.to(device)
    comps.dit.set_trainable()
    comps.dit.train()
    if cfg.activation_checkpointing:
        comps.dit.transformer.enable_gradient_checkpointing()
    pipe = MultiAnimatePipeline(comps)
    if describe_only:
        if on_meta:
            assert cfg.model.wan_folder is not None
            check_files(comps.dit, cfg.model.wan_folder / "transformer", "transformer.")
        return Built(
            comps, pipe, ConditionedDenoiser(comps.dit), base_bytes(comps.dit.transformer), 0, peak_rss_bytes() - rss0
        )
    model = shard_denoiser(comps.dit, dtype)
    read = 0
    if on_meta:
        assert cfg.model.wan_folder is not None
        read = load_sharded(model, cfg.model.wan_folder / "transformer", "dit.transformer.", device)
    return Built(comps, pipe, model, base_bytes(comps.dit.transformer), read, peak_rss_bytes() - rss0)


def peak_rss_reset() -> int:
    """Reset the kernel's resident-peak counter (VmHWM) to the current RSS and return that."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _rss_bytes()


def peak_rss_bytes() -> int:
    """This process's resident peak (VmHWM) since start or the last ``peak_rss_reset``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _rss_bytes()


def describe(built: Built) -> list[str]:
    """The dry run's lines: trained and frozen parameters by dtype, the persons allowed."""
    dit = built.comps.dit
    trainable = [p for p in dit.parameters() if p.requires_grad]
    frozen = [p for p in dit.transformer.parameters() if not p.requires_grad]
    base = built.comps.config.torch_dtype
    t_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    lines = [
        f"trainable: {sum(p.numel() for p in trainable)} parameters ({', '.join(t_dtypes)}); "
        f"frozen: {sum(p.numel() for p in frozen if p.dtype == base)} parameters ({str(base).removeprefix('torch.')})",
    ]
    kept = sum(p.numel() for p in frozen if p.dtype != base)
    if kept:
        lines.append(
            f"frozen in float32 (diffusers keeps the norms, time embedder and modulation so): {kept} parameters"
        )
    lines.append(f"vae: {built.comps.vae.dtype}; image encoder: {built.comps.image_encoder.dtype}")
    loaded = built.comps.loaded
    source = f"checkpoint {loaded.source}" if loaded is not None else "fresh LoRA and encoders"
    lines.append(f"persons: at most {dit.max_persons} ({source}; label pool {dit.label_pool})")
    if loaded is not None and loaded.widened:
        ((old, new),) = loaded.widened.values()
        lines.append(
            f"label layer widened {old} -> {new} channels for fine-tuning; the checkpoint itself animates {old - 1}"
        )
    return lines


def train(cfg: TrainConfig, dry_run: bool = False) -> dict:
    rank, world, device = _setup_distributed()
    run_dir = cfg.run_dir
    if dry_run:  # builds the model as training would; needs no shards or embeddings
        built = build_training_model(cfg, device, describe_only=True)
        if rank == 0:
            print("\n".join(describe(built)), flush=True)
        trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
        return {"trainable_params": trainable, "world": world, "shards": len(sorted(cfg.workspace.glob(cfg.shards)))}
    shards = [Path(os.path.realpath(p)) for p in check_inputs(cfg)]  # this set, not whatever the link names later
    reading = hold_for_reading(shards)  # the set stays while this run reads it, even once a newer one is published
    if not all(p.exists() for p in shards):
        raise ValueError(
            f"the shards under {cfg.workspace / cfg.shards} were replaced as the run started; start it again"
        )
    with claim_run_folder(run_dir, rank):  # before anything is written there: one writer per run folder
        result = _train(cfg, shards, rank, world, device)
    for handle in reading:
        handle.close()
    return result


def _train(cfg: TrainConfig, shards: list[Path], rank: int, world: int, device: torch.device) -> dict:
    run_dir = cfg.run_dir
    encoder_id = profile_encoder_id(cfg.model.profile, cfg.model.wan_folder)
    cache = EmbeddingCache(Workspace(cfg.workspace).embeddings, encoder_id)
    if rank == 0:
        remove_checkpoint_leftovers(run_dir)  # of saves a kill or a full disk interrupted
        with atomic_path(run_dir / "config.json") as tmp:
            tmp.write_text(cfg.model_dump_json(indent=2))
    _barrier()

    built = build_training_model(cfg, device)
    comps, pipe, model, dtype = built.comps, built.pipe, built.model, cfg.compute_dtype
    if built.dit_read_bytes:
        print(
            f"rank {rank}: read {built.dit_read_bytes / 2**30:.2f} of the DiT's {built.dit_bytes / 2**30:.2f} GiB; "
            f"host memory +{built.rss_added_bytes / 2**30:.2f} GiB",
            flush=True,
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))

    step = 0
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        step = _load_checkpoint(resume, model, optimizer, scheduler)
        if rank == 0:
            print(f"resumed from {resume} at step {step}", flush=True)
    sigmas, weights = training_sigmas(cfg.model.shift), training_weights(cfg.model.shift)
    held = None
    if cfg.eval_every:
        held = prepare_held_out(cfg, eval_shards(cfg), pipe, cache, device, dtype, rank, world)
    loader_cfg = cfg.run_loader(len(shards), cfg.seed)
    readers = max(1, cfg.num_workers)
    metrics_fh = metrics = None
    if rank == 0:
        metrics_fh, metrics = _metrics_writer(run_dir, step)
    samples_per_step = cfg.batch_size * cfg.grad_accum * world
    last_loss = float("nan")
    try:
        while step < cfg.max_steps:
            # one loader epoch = the steps up to the next checkpoint boundary (exact resumption)
            epoch = step // cfg.checkpoint_every
            epoch_end = min(cfg.max_steps, (epoch + 1) * cfg.checkpoint_every)
            batches_needed = (epoch_end - step) * cfg.grad_accum
            per_reader = math.ceil(batches_needed / readers)
            loader = make_loader(
                [str(s) for s in shards],
                loader_cfg,
                cfg.batch_size,
                cfg.num_workers,
                epoch_samples=per_reader * readers * cfg.batch_size,
                rank=rank,
                world_size=world,
            )
            loader.dataset.set_epoch(epoch)
            batches = iter(loader)
            while step < epoch_end:
                _maybe_fault(rank, step, run_dir)
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    gen, rng = step_generators(cfg.seed, rank, step, micro)
                    frozen = encode_frozen(pipe, batch, cache.get_many(batch["caption"]), device, dtype)
                    loss = (
                        training_loss(model, comps.dit.label_pool, frozen, batch, cfg, sigmas, weights, gen, rng)
                        / cfg.grad_accum
                    )
                    loss.backward()
                    total += loss.detach()
                # max_norm inf: no clipping (the release's default), the norm is still logged
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                optimizer.step()
                scheduler.step()
                step += 1
                if dist.is_initialized():
                    dist.all_reduce(total)  # SUM: gloo has no AVG
                    total /= world
                last_loss = float(total)
                elapsed = time.perf_counter() - t0
                figures = {}
                if held is not None and step % cfg.eval_every == 0:
                    figures = held_out_losses(model, comps.dit.label_pool, held, sigmas, device)
                if metrics is not None:
                    metrics.writerow(
                        {
                            "step": step,
                            "loss": f"{last_loss:.6f}",
                            "lr": f"{scheduler.get_last_lr()[0]:.3e}",
                            "grad_norm": f"{float(grad_norm):.4f}",
                            "step_time_s": f"{elapsed:.4f}",
                            "samples_per_s": f"{samples_per_step / elapsed:.3f}",
                            "peak_mem_gib": f"{_peak_mem_gib(device):.3f}",
                        }
                        | {k: f"{v:.6f}" for k, v in figures.items()}
                    )
                    metrics_fh.flush()
                    print(f"step {step}/{cfg.max_steps} loss {last_loss:.5f} ({elapsed:.2f} s)", flush=True)
                    if figures:
                        print(", ".join(f"{k} {v:.5f}" for k, v in figures.items()), flush=True)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    _save_checkpoint(run_dir, step, model, optimizer, scheduler, rank, cfg.keep_checkpoints)
            del batches, loader
    finally:
        if metrics_fh is not None:
            metrics_fh.close()

    full = get_model_state_dict(
        model, options=StateDictOptions(ignore_frozen_params=True, full_state_dict=True, cpu_offload=True)
    )
    full = {k.removeprefix("dit."): v for k, v in full.items()}
    if rank == 0:
        save_adapter_tensors(
            full,
            run_dir / "final",
            comps.dit.label_pool,
            cfg.model.lora_rank,
            cfg.model.lora_alpha,
            dict(comps.dit.transformer.config),
        )
        write_loss_curve(run_dir)
    _barrier()
    return {"step": step, "loss": last_loss, "final": str(run_dir / "final")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="MultiAnimate LoRA fine-tuning (start with torchrun)")
    ap.add_argument("--config", type=Path, required=True, help="TrainConfig as JSON")
    ap.add_argument(
        "--dry-run", action="store_true", help="build the model as training would and describe it, do not train"
    )
    args = ap.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        die_with_launcher()
    cfg = TrainConfig.model_validate_json(args.config.read_text())
    try:
        train(cfg, dry_run=args.dry_run)
    except BaseException as exc:
        sys.stderr.flush()
        os.write(2, (failure_line(exc) + "\n").encode())  # one write: the other ranks' lines cannot split it
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo workers occasionally abort at interpreter exit after a correct run


if __name__ == "__main__":
    main()
