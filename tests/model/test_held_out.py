"""Held-out evaluation during training (TrainConfig.eval_every, model/held_out.py): a real
2-process run logs the figures on the steps asked, and they equal the same loss computed
independently, through the generation pipeline's own encoders and forward, from the run's
final weights."""

from __future__ import annotations

import csv
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from data_schemas.config import ShardConfig
from data_schemas.model import ModelConfig
from data_schemas.workspace import Workspace
from model.held_out import SIGMA_INDICES, eval_noise, held_out_samples
from model.train import check_inputs, eval_shards, launch_command, training_sigmas
from tests.helpers.models import run_config
from tests.helpers.workspaces import make_train_workspace


def test_eval_every_needs_held_out_shards(train_workspace):
    with pytest.raises(ValueError, match=r"no held-out shards match .*val-\*\.tar.*val_fraction"):
        check_inputs(run_config(train_workspace, "held-out", eval_every=2))


def pipeline_loss(pipe, sample: dict, text: torch.Tensor, clip: int, sigmas: torch.Tensor, keep_pose: bool) -> float:
    """The unweighted flow-matching loss of one clip over the fixed levels, by the pipeline's
    path: VAE latents as model/evaluate.py encodes them, the reference through
    encode_reference, the conditions through condition_tensors, the velocity from predict."""
    from model.evaluate import vae_latents
    from model.pipeline import Conditions

    dit = pipe.c.dit
    cond = Conditions(
        ref_image=sample["ref_image"].permute(1, 2, 0).numpy(),
        pose=sample["pose"].permute(1, 2, 3, 0).numpy(),
        ref_pose=sample["ref_pose"].permute(1, 2, 0).numpy(),
        labels=sample["labels"].numpy(),
        prompt_embeds=text,
        negative_embeds=None,
        num_persons=int(sample["num_persons"]),
    )
    T, H, W = cond.check(dit.max_persons)
    image, y = pipe.encode_reference(cond.ref_image, T, H, W)
    pose, labels, ref_pose, channels = pipe.condition_tensors(cond)
    scale = 1.0 if keep_pose else 0.0
    tokens = dit.condition_tokens(pose, labels, channels) * scale
    ref_features = dit.ref_pose_guider(ref_pose) * scale
    x0 = vae_latents(pipe, sample["video"])[None]
    losses = []
    for level in SIGMA_INDICES:
        sigma = float(sigmas[level])
        noise = eval_noise(clip, level, x0.shape)
        x_t = (1 - sigma) * x0 + sigma * noise
        timestep = torch.tensor([sigma * 1000.0])
        v = pipe.predict(x_t, y, timestep, image, text[None], None, tokens, ref_features, 1.0)
        losses.append(float((v.float() - (noise - x0)).square().mean()))
    return float(np.mean(losses))


@pytest.mark.slow
def test_training_scores_held_out_clips_every_n_steps(tmp_path):
    ws = make_train_workspace(tmp_path / "ws", ShardConfig(val_fraction=0.5), num_clips=6)
    assert sorted(Workspace(ws).shards.glob("val-*.tar")), "the split left no held-out clip"
    # 3 clips over 2 ranks: one rank pads with a weight-0 repeat
    cfg = run_config(ws, "held-out", max_steps=2, checkpoint_every=2, eval_every=1, eval_clips=3)
    config = tmp_path / "run.json"
    config.write_text(cfg.model_dump_json())
    done = subprocess.run(launch_command(config, 2), capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with (cfg.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2"]
    for row in rows:
        figures = {k: float(row[k]) for k in ("val_loss", "val_loss_pose_off", "val_pose_gain")}
        assert all(math.isfinite(v) for v in figures.values()) and figures["val_loss"] > 0, row
        assert figures["val_pose_gain"] == pytest.approx(
            figures["val_loss_pose_off"] / figures["val_loss"] - 1, abs=2e-6
        )

    from model.components import build_components
    from model.pipeline import MultiAnimatePipeline
    from model.text_cache import EmbeddingCache
    from model.text_encoder import profile_encoder_id

    pipe = MultiAnimatePipeline(build_components(ModelConfig(multianimate=cfg.run_dir / "final")))
    cache = EmbeddingCache(Workspace(ws).embeddings, profile_encoder_id("tiny"))
    samples = held_out_samples(cfg, eval_shards(cfg))
    assert len(samples) == 3
    sigmas = training_sigmas(cfg.model.shift)
    with torch.no_grad():
        expected = {
            key: float(
                np.mean(
                    [pipeline_loss(pipe, s, cache.get(s["caption"]), i, sigmas, keep) for i, s in enumerate(samples)]
                )
            )
            for key, keep in (("val_loss", True), ("val_loss_pose_off", False))
        }
    for key, value in expected.items():
        assert float(rows[-1][key]) == pytest.approx(value, rel=1e-3), (key, rows[-1][key], value)
