"""The learning check's measures (model/evaluate.py) against direct computations."""

from __future__ import annotations

import numpy as np
import torch

from data_schemas.model import ModelConfig
from model.components import build_components
from model.evaluate import (
    foreground_share,
    frozen_figures,
    frozen_figures_mse,
    latent_labels,
    region_scores,
    vae_latents,
)
from model.pipeline import MultiAnimatePipeline
from preprocess.synthetic import SyntheticSpec, render_clip


def sample(**spec) -> dict:
    clip = render_clip(SyntheticSpec(width=64, height=48, num_frames=9, background="flat", **spec))
    return {
        "video": torch.from_numpy(clip.frames).permute(3, 0, 1, 2),
        "labels": torch.from_numpy(clip.label_map()),
        "num_persons": 2,
    }


def test_region_scores_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    truth, generated = torch.randn(16, 3, 6, 8, generator=g), torch.randn(16, 3, 6, 8, generator=g)
    labels = np.zeros((3, 6, 8), np.uint8)
    labels[1:, 1:3, 1:3], labels[1:, 3:5, 5:7] = 1, 2
    labels[0] = 2  # frame 0 (the reference) is never scored
    errors, _correct = region_scores(generated, truth, labels, 2)
    for k, err in zip((1, 2), errors):
        cells = [(t, i, j) for t in (1, 2) for i in range(6) for j in range(8) if labels[t, i, j] == k]
        want = np.mean([float((generated[:, t, i, j] - truth[:, t, i, j]).square().mean()) for t, i, j in cells])
        assert abs(err - want) < 1e-6
    assert region_scores(truth, truth, labels, 2) == ([0.0, 0.0], [True, True])
    swapped = truth.clone()
    swapped[:, 1:, 1:3, 1:3], swapped[:, 1:, 3:5, 5:7] = truth[:, 1:, 3:5, 5:7], truth[:, 1:, 1:3, 1:3]
    assert region_scores(swapped, truth, labels, 2)[1] == [False, False]  # identities swapped


def test_latent_labels_take_the_last_pixel_frame_of_each_latent_frame():
    labels = np.arange(9)[:, None, None] * np.ones((9, 16, 24), np.uint8)
    assert latent_labels(labels)[:, 0, 0].tolist() == [0, 4, 8]
    assert latent_labels(labels).shape == (3, 2, 3)


def test_frozen_figures_cost_nothing_without_motion_and_much_with_fast_walkers():
    pipe = MultiAnimatePipeline(build_components(ModelConfig()))
    still = sample(seed=0, motions=("walk", "walk"))
    still["video"] = frozen_figures(still["video"])
    assert frozen_figures_mse(pipe, [still]) == 0.0
    moving = sample(seed=0, motions=("walk", "walk"), walk_speed=0.8)
    assert frozen_figures_mse(pipe, [moving]) > 0.1  # the tiny VAE's latents see where the figures went


def test_foreground_share_against_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(16, 3, 6, 8, generator=g)
    labels = np.zeros((3, 6, 8), np.uint8)
    labels[0, :2, :2], labels[1:, 2:4, 3:6] = 1, 2
    background = np.mean(
        [latents[:, 0, i, j].numpy() for i in range(6) for j in range(8) if labels[0, i, j] == 0], axis=0
    )
    energy = {
        (t, i, j): float(((latents[:, t, i, j].numpy() - background) ** 2).sum())
        for t in (1, 2)
        for i in range(6)
        for j in range(8)
    }
    want = sum(e for (t, i, j), e in energy.items() if labels[t, i, j] > 0) / sum(energy.values())
    assert abs(foreground_share(latents, labels) - want) < 1e-5
    # all the foreground inside the persons' regions -> 1; none -> 0
    placed = latents[:, :1].mean(dim=(2, 3), keepdim=True).expand(16, 3, 6, 8).clone()
    placed[:, 1:, 2:4, 3:6] += 1.0
    assert abs(foreground_share(placed, labels) - 1.0) < 1e-6
    labels_elsewhere = labels.copy()
    labels_elsewhere[1:] = 0
    labels_elsewhere[1:, 0, 0] = 1
    assert foreground_share(placed, labels_elsewhere) < 1e-6


def test_true_clips_put_their_foreground_in_the_persons_regions():
    """The measure sees the figures in the tiny VAE's latents: a true clip of slow walkers
    (the learning check's data) puts several times the regions' share of the frame there."""
    pipe = MultiAnimatePipeline(build_components(ModelConfig()))
    clip = sample(seed=3, motions=("walk", "walk"), walk_speed=0.3)
    labels = latent_labels(clip["labels"].numpy())
    assert foreground_share(vae_latents(pipe, clip["video"]), labels) > 2 * float((labels[1:] > 0).mean())
