"""Learning check: a small model fine-tuned for a few minutes on synthetic two-person clips,
against the untrained model and a pose-blind control trained alike, measured in latent space
on held-out clips with new persons and motion (model/evaluate.py). tests/model/test_learning.py runs
it in CI and holds it to its margins.

    .venv/bin/python bench/learning.py      # LEARNING_STEPS, LEARNING_LR, LEARNING_BASE_STEPS

As with the real model, fine-tuning starts from a base that already denoises: the tiny
transformer is first pretrained as a plain image-to-video model on the same clips, with no
pose or identity condition (model/pretrain.py); "untrained" is that base with a fresh LoRA
and fresh (zero-output) encoders. Backgrounds are flat, so the persons are the clips' only
content; both persons walk from a random point of their back-and-forth track
(``walk_speed``), so neither the reference frame nor the clip's timing tells where they go.
The 9 frames are taken at stride 2: slow enough that a latent frame (4 pixel frames) shows
each figure in one place (at stride 4 the figures smeared over the cells they crossed, and
even the true clip put only 0.20 of its foreground inside the persons' regions; 0.47 now).
Fine-tuning drops no condition: with the release's 10 % image dropout, the few steps without a
reference frame dominated a short run's gradient. Sampling guides (scale 2) as the release
does, the unconditional pass without pose and identity tokens.

The measure is ``foreground_share`` (model/evaluate.py): where the generated figures are.
``frozen figures`` is the true clip with every figure frozen where the reference shows it;
``true clip`` is the ceiling.

Prints last ``pose_following`` (share with the clip's own poses / with another clip's, - 1),
``margin_vs_untrained`` and ``margin_vs_pose_blind`` (share of the full model / theirs, - 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_schemas.config import ShardConfig
from data_schemas.model import ModelConfig
from data_schemas.train import TrainConfig
from data_schemas.workspace import Workspace
from model.components import build_components
from model.data import LoaderConfig, make_dataset
from model.evaluate import (
    EvalResult,
    PoseBlindPipeline,
    evaluate,
    foreground_share,
    frozen_figures,
    frozen_figures_mse,
    latent_labels,
    vae_latents,
)
from model.pipeline import MultiAnimatePipeline, SamplingConfig
from model.pretrain import pretrain_tiny_base
from model.text_cache import EmbeddingCache, captions_from_shards, fill_cache
from model.text_encoder import WAN_NEGATIVE_PROMPT, build_tiny_text_encoder, profile_encoder_id
from model.train import launch_command
from preprocess.shards import write_shards
from tests.helpers.workspaces import make_workspace

STEPS = int(os.environ.get("LEARNING_STEPS", "100"))
LR = float(os.environ.get("LEARNING_LR", "1e-3"))
BASE_STEPS = int(os.environ.get("LEARNING_BASE_STEPS", "200"))
GUIDANCE = 2.0
FRAMES, HEIGHT, WIDTH, STRIDE = 9, 48, 64, 2
SHAPE = {
    "num_frames": FRAMES,
    "height": HEIGHT,
    "width": WIDTH,
    "max_stride": STRIDE,
    "min_stride": STRIDE,
}  # the runs' loader
CLIPS = dict(clips_per_source=1, num_frames=40, background="flat", motions=("walk", "walk"), walk_speed=0.3)


def train_run(ws: Path, name: str, pose_condition: bool, base: Path) -> Path:
    # gradient clipping at 1: the margins below were measured with it (the default is now off)
    cfg = TrainConfig(
        workspace=ws,
        run_name=name,
        model=ModelConfig(tiny_transformer=base),
        loader=SHAPE,
        max_steps=STEPS,
        checkpoint_every=STEPS,
        num_workers=0,
        nproc=1,
        lr=LR,
        warmup_steps=10,
        pose_condition=pose_condition,
        image_dropout=0.0,
        pose_dropout=0.0,
        activation_checkpointing=False,
        grad_clip=1.0,
    )
    path = ws / f"{name}.json"
    path.write_text(cfg.model_dump_json())
    # one process, both cores (torchrun would set OMP_NUM_THREADS=1)
    done = subprocess.run(
        launch_command(path, 1), capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2")
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return cfg.run_dir / "final"


def prepare(tmp_path: Path, num_clips: int = 64) -> tuple[Path, Path, Path]:
    """Training and held-out workspaces (shards, prompt cache) and the pretrained tiny base."""
    ws, held_out = tmp_path / "train", tmp_path / "held-out"
    ws.mkdir()
    held_out.mkdir()
    make_workspace(ws, num_clips=num_clips, **CLIPS)
    make_workspace(held_out, num_clips=6, first_seed=1000, **CLIPS)  # new persons, new motion
    write_shards(ws, ShardConfig(val_fraction=0.0, target_shard_bytes=200_000))
    write_shards(held_out, ShardConfig(val_fraction=0.0))
    encoder = build_tiny_text_encoder()
    texts = captions_from_shards(Workspace(ws).shards_index) + captions_from_shards(Workspace(held_out).shards_index)
    fill_cache(Workspace(ws).embeddings, encoder, texts + [WAN_NEGATIVE_PROMPT])

    base = tmp_path / "tiny-base"
    shape = TrainConfig(workspace=ws, loader=SHAPE, grad_clip=1.0)
    print("base pretraining:", pretrain_tiny_base(shape, base, steps=BASE_STEPS), flush=True)
    return ws, held_out, base


def run(tmp_path: Path) -> tuple[dict[str, EvalResult], dict[str, float]]:
    """Prepare, fine-tune the full model and the pose-blind control, evaluate; print every
    result; return the results and the foreground shares (with the true and frozen clips')."""
    ws, held_out, base = prepare(tmp_path)
    weights = {"full": train_run(ws, "full", True, base), "pose-blind": train_run(ws, "pose-blind", False, base)}

    loader_cfg = LoaderConfig(
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        max_stride=STRIDE,
        min_stride=STRIDE,
        crop_fraction=0,
        shuffle_buffer=0,
    )
    samples = list(
        make_dataset(sorted(str(p) for p in Workspace(held_out).shards.glob("*.tar")), loader_cfg, rank=0, world_size=1)
    )
    cache = EmbeddingCache(Workspace(ws).embeddings, profile_encoder_id("tiny"))
    prompts, negative = [cache.get(s["caption"]) for s in samples], cache.get(WAN_NEGATIVE_PROMPT)
    sampling = SamplingConfig(steps=10, guidance_scale=GUIDANCE, progress=False)

    def pipeline(weights: Path | None, kind: type[MultiAnimatePipeline] = MultiAnimatePipeline) -> MultiAnimatePipeline:
        return kind(build_components(ModelConfig(tiny_transformer=base, multianimate=weights)))

    full_pipe = pipeline(weights["full"])
    # the same clips driven by another clip's poses and label map: a model that follows the
    # driving poses puts the figures elsewhere (the pose-blind control cannot tell the difference)
    others = samples[1:] + samples[:1]
    results = {
        "untrained": evaluate(pipeline(None), samples, prompts, sampling, negative_embeds=negative),
        "full": evaluate(full_pipe, samples, prompts, sampling, negative_embeds=negative),
        "pose-blind": evaluate(
            pipeline(weights["pose-blind"], PoseBlindPipeline), samples, prompts, sampling, negative_embeds=negative
        ),
        "full, driven by another clip": evaluate(
            full_pipe, samples, prompts, sampling, driving=others, negative_embeds=negative
        ),
    }
    for name, result in results.items():
        print(f"{name}: {result}")
    shares = {name: result.foreground_share for name, result in results.items()}
    labels = [latent_labels(s["labels"].numpy()) for s in samples]
    for name, videos in (
        ("true clip", [s["video"] for s in samples]),
        ("frozen figures", [frozen_figures(s["video"]) for s in samples]),
    ):
        shares[name] = float(
            np.mean([foreground_share(vae_latents(full_pipe, v), lab) for v, lab in zip(videos, labels)])
        )
        print(f"{name}: foreground_share {shares[name]:.3f}")
    print(f"frozen figures: person_mse {frozen_figures_mse(full_pipe, samples):.4f}")
    return results, shares


def main(tmp_path: Path) -> None:
    _, shares = run(tmp_path)
    print(f"pose_following: {shares['full'] / shares['full, driven by another clip'] - 1:.3f}")
    print(f"margin_vs_untrained: {shares['full'] / shares['untrained'] - 1:.3f}")
    print(f"margin_vs_pose_blind: {shares['full'] / shares['pose-blind'] - 1:.3f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
