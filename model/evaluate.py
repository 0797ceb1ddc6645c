"""Held-out evaluation in latent space: does a generated video follow the driving poses and
keep every person's identity?

A random-weight VAE decodes to noise, so the comparison happens where the model works: the
generated latents against the VAE encoding of the held-out ground-truth clip, inside each
person's ground-truth region (the label map at the latent grid), over the latent frames the
model had to make (frame 0 is given by the reference image).

* ``person_mse``: mean squared error inside the persons' regions, of the fully generated
  latents (sampled from noise);
* ``denoise_mse``: the same error of one-step predictions x0 = x_t - sigma v from the
  ground truth noised at ``sigma`` (fixed noise): the conditioning's effect without the
  drift of a whole sampling trajectory, so it shows what a briefly trained model learnt;
* ``foreground_share``: the share of the generated frames' foreground (departure from the
  background, which the reference frame shows) that lies inside the persons' true regions:
  where the figures were put. Unlike ``person_mse`` it cannot be won by hedging: a model that
  does not know where the persons went spreads them, or blurs them, over the places they may
  be and scores near the regions' share of the frame; one that follows the poses scores
  near the true clip's own share;
* ``identity_accuracy``: share of (clip, person) pairs whose generated region looks more like
  that person's true region than like any other person's (mean latent vectors, L2).

Legend: t latent frames, h x w latent grid (pixels / 8), K persons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.pipeline import Conditions, MultiAnimatePipeline, SamplingConfig


@dataclass
class EvalResult:
    person_mse: float
    identity_accuracy: float
    denoise_mse: float
    foreground_share: float
    num_clips: int

    def __str__(self) -> str:
        return (
            f"person_mse {self.person_mse:.4f}, identity_accuracy {self.identity_accuracy:.3f}, "
            f"denoise_mse {self.denoise_mse:.4f}, foreground_share {self.foreground_share:.3f} over {self.num_clips} clips"
        )


class PoseBlindPipeline(MultiAnimatePipeline):
    """Generation as a pose-blind model was trained: pose, identity and reference-pose
    features always zero."""

    def predict(self, x, y, timestep, image, text, negative, tokens, ref_features, guidance, cache_key=""):
        return super().predict(x, y, timestep, image, text, negative, tokens * 0, ref_features * 0, guidance, cache_key)


def latent_labels(labels_THW: np.ndarray) -> np.ndarray:
    """The label map at the latent grid: latent frame j >= 1 stands for pixel frames
    4j-3..4j (its last one is taken); pixel (8i+4, 8j+4) stands for its 8x8 cell."""
    T = labels_THW.shape[0]
    frames = [0] + [4 * j for j in range(1, (T - 1) // 4 + 1)]
    return labels_THW[frames][:, 4::8, 4::8]


@torch.no_grad()
def vae_latents(pipe: MultiAnimatePipeline, video_CTHW: torch.Tensor) -> torch.Tensor:
    """Normalised VAE latents [16, t, h, w] of a uint8 clip."""
    vae = pipe.c.vae
    x = (video_CTHW[None].float() / 127.5 - 1).to(pipe.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(x)
    return ((vae.encode(x).latent_dist.mode() - mean) / std)[0].float().cpu()


def region_scores(
    generated: torch.Tensor, truth: torch.Tensor, labels_thw: np.ndarray, num_persons: int
) -> tuple[list[float], list[bool]]:
    """Per person: MSE inside its region (frames >= 1), and whether its generated mean latent
    is nearest to its own true mean latent."""
    errors, correct = [], []
    gen, tru = generated[:, 1:], truth[:, 1:]
    lab = torch.from_numpy(labels_thw[1:].astype(np.int64))
    means_true, means_gen = {}, {}
    for k in range(1, num_persons + 1):
        region = lab == k
        if int(region.sum()) == 0:
            continue
        errors.append(float((gen[:, region] - tru[:, region]).square().mean()))
        means_gen[k], means_true[k] = gen[:, region].mean(dim=1), tru[:, region].mean(dim=1)
    for k, g in means_gen.items():
        nearest = min(means_true, key=lambda j: float((g - means_true[j]).norm()))
        correct.append(nearest == k)
    return errors, correct


def foreground_share(latents: torch.Tensor, labels_thw: np.ndarray) -> float:
    """Share of the foreground energy of latent frames >= 1 inside the persons' regions.
    Foreground energy of a cell: its squared distance to the background latent, the mean of
    frame 0's background cells (frame 0 encodes the reference image)."""
    background = latents[:, 0][:, labels_thw[0] == 0].mean(dim=1)
    energy = (latents[:, 1:] - background[:, None, None, None]).square().sum(dim=0)
    persons = torch.from_numpy(labels_thw[1:] > 0)
    return float(energy[persons].sum() / energy.sum())


@torch.no_grad()
def denoised_latents(
    pipe: MultiAnimatePipeline, cond: Conditions, truth: torch.Tensor, sigma: float, seed: int
) -> torch.Tensor:
    """x0 predicted in one step from the truth noised at ``sigma``, with the pipeline's own
    conditions (so a pose-blind pipeline drops them here too)."""
    dit, device = pipe.c.dit, pipe.device
    T, H, W = cond.check(dit.max_persons)
    image, y = pipe.encode_reference(cond.ref_image, T, H, W)
    dtype = y.dtype
    pose, labels, ref_pose, channels = pipe.condition_tensors(cond)
    tokens = dit.condition_tokens(pose, labels, channels).to(dtype)
    ref_features = dit.ref_pose_guider(ref_pose).to(dtype)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(seed))
    x0 = truth[None].to(device, dtype)
    x_t = (1 - sigma) * x0 + sigma * noise.to(device, dtype)
    timestep = torch.full((1,), 1000.0 * sigma, device=device, dtype=dtype)
    v = pipe.predict(
        x_t, y, timestep, image, cond.prompt_embeds[None].to(device, dtype), None, tokens, ref_features, 1.0
    )
    return (x_t - sigma * v)[0].float().cpu()


def frozen_figures(video_CTHW: torch.Tensor) -> torch.Tensor:
    """The clip with every frame replaced by the first: its figures never move from where the
    reference frame shows them, what a model that ignores the driving motion would make."""
    return video_CTHW[:, :1].expand_as(video_CTHW).contiguous()


@torch.no_grad()
def frozen_figures_mse(pipe: MultiAnimatePipeline, samples: list[dict]) -> float:
    """``person_mse`` of the VAE-encoded ``frozen_figures`` clips: a model that follows the
    poses must score below it."""
    errors: list[float] = []
    for sample in samples:
        video = sample["video"]
        labels = latent_labels(sample["labels"].numpy())
        errors += region_scores(
            vae_latents(pipe, frozen_figures(video)), vae_latents(pipe, video), labels, int(sample["num_persons"])
        )[0]
    return float(np.mean(errors))


def evaluate(
    pipe: MultiAnimatePipeline,
    samples: list[dict],
    prompt_embeds: list[torch.Tensor],
    sampling: SamplingConfig,
    denoise_sigmas: tuple[float, ...] = (0.5, 0.8),
    driving: list[dict] | None = None,
    negative_embeds: torch.Tensor | None = None,
) -> EvalResult:
    """Generate every held-out sample (loader output, data_schemas/batch.py) from its first
    frame, poses and label map, and score it against its own latents. ``driving`` (one per
    sample) replaces the poses and label map the model is given, not those it is scored
    with: with another clip's motion, a model that follows the driving poses scores worse."""
    errors: list[float] = []
    denoise: list[float] = []
    correct: list[bool] = []
    shares: list[float] = []
    for i, (sample, text) in enumerate(zip(samples, prompt_embeds)):
        drive = sample if driving is None else driving[i]
        cond = Conditions(
            ref_image=sample["ref_image"].permute(1, 2, 0).numpy(),
            pose=drive["pose"].permute(1, 2, 3, 0).numpy(),
            ref_pose=sample["ref_pose"].permute(1, 2, 0).numpy(),
            labels=drive["labels"].numpy(),
            prompt_embeds=text,
            negative_embeds=negative_embeds,
            num_persons=int(drive["num_persons"]),
        )
        generated = pipe(cond, sampling).latents[0].float().cpu()
        truth = vae_latents(pipe, sample["video"])
        labels = latent_labels(sample["labels"].numpy())
        e, c = region_scores(generated, truth, labels, int(sample["num_persons"]))
        errors += e
        correct += c
        shares.append(foreground_share(generated, labels))
        for j, sigma in enumerate(denoise_sigmas):
            x0 = denoised_latents(pipe, cond, truth, sigma, seed=sampling.seed + j)
            denoise += region_scores(x0, truth, labels, int(sample["num_persons"]))[0]
    return EvalResult(
        float(np.mean(errors)), float(np.mean(correct)), float(np.mean(denoise)), float(np.mean(shares)), len(samples)
    )
