"""The evaluation protocol for held-out clips, the networks behind it, and its score records.

One frozen, versioned :class:`Protocol` holds every constant of the measures
(``model/metrics.py``); every result carries ``PROTOCOL_VERSION`` and the protocol's digest,
so numbers made under other rules are never compared by mistake. :class:`EvalNetworks`
names the local files of the feature networks (``model/feature_nets.py``); ``None`` means
seeded tiny random networks, and every result names which networks made it (a tiny number
is a smoke test, never a score).

Persons are numbered as in the masks' label map: person k (1-based) is label k, and every
per-person tuple (the ``person_*`` fields) holds person k at index k - 1. ``None`` in a
measure means "nothing to measure" (a person never visible, no frame pair, too few frames).

Where the protocol comes from (the anchors' evaluation code, e.g. DisCo's tool/metrics,
which the animation papers reuse): PSNR/SSIM/LPIPS per frame, averaged; "FID-VID" is the
Frechet distance of 3-D ResNet-50 (Kinetics-400) features of 16-frame clips at 112 x 112;
"FVD" that of I3D (Kinetics-400) logits of 16-frame clips at 224 x 224.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bump on any change of a Protocol default or of a measure's definition in model/metrics.py.
PROTOCOL_VERSION = 1


class Protocol(BaseModel):
    """Every constant of the evaluation; the defaults ARE protocol version PROTOCOL_VERSION."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- frames, geometry, colour (the conform rule, model/metrics.py: conform) -------------------
    fps: float = Field(
        25.0,
        gt=0,
        description="frame rate both videos are compared at (ingest's clip rate); "
        "other rates are resampled by nearest timestamp (frame i <- source frame round(i * src / fps))",
    )
    start_frame: int = Field(0, ge=0, description="first frame compared (0: the reference frame is included)")
    max_frames: int | None = Field(
        None,
        ge=1,
        description="frames compared per clip from start_frame; None: all "
        "the truth has. A shorter generated video is compared on the common prefix",
    )
    short_side: int = Field(
        480,
        ge=16,
        description="the truth is scaled, aspect kept, so its shorter side is this "
        "many pixels (both sides rounded to even); the generated video is resized to exactly that "
        "size (aspect not kept: undoes a job's squash to its own size)",
    )
    resize_down: Literal["area"] = Field("area", description="interpolation when a side shrinks (cv2 INTER_AREA)")
    resize_up: Literal["bicubic"] = Field("bicubic", description="interpolation when no side shrinks (cv2 INTER_CUBIC)")
    colour_range: Literal["rgb-uint8-full"] = Field(
        "rgb-uint8-full", description="frames are RGB uint8, full range 0..255 (data range 255)"
    )
    # -- PSNR ---------------------------------------------------------------------------------
    psnr_max_db: float = Field(
        100.0,
        gt=0,
        description="PSNR of a frame with zero error (mean of per-frame PSNRs, each over all pixels and channels)",
    )
    # -- SSIM (Wang et al. 2004, as skimage with gaussian_weights and use_sample_covariance=False) --
    ssim_window: int = Field(
        11,
        ge=3,
        description="side of the gaussian window (odd); border pixels closer than "
        "half a window are left out of the mean",
    )
    ssim_sigma: float = Field(1.5, gt=0, description="standard deviation of the gaussian window in pixels")
    ssim_k1: float = Field(0.01, gt=0, description="C1 = (k1 * 255)^2")
    ssim_k2: float = Field(0.03, gt=0, description="C2 = (k2 * 255)^2")
    ssim_channels: Literal["rgb-mean"] = Field("rgb-mean", description="SSIM of each RGB channel, averaged")
    # -- LPIPS (Zhang et al. 2018, v0.1 linear heads) --------------------------------------------
    lpips_backbone: Literal["alex", "vgg"] = Field(
        "alex",
        description="LPIPS backbone (AlexNet: what the anchors report); inputs in [-1, 1] at the compared "
        "size, per frame, averaged",
    )
    # -- FVD -----------------------------------------------------------------------------------
    fvd_network: Literal["i3d-kinetics400"] = Field(
        "i3d-kinetics400",
        description="Inflated Inception-V1 (I3D) trained on Kinetics-400, PyTorch port (pytorch-i3d layout)",
    )
    fvd_feature: Literal["logits-400"] = Field(
        "logits-400",
        description="the 400 pre-softmax logits, averaged over the remaining time steps (as the original FVD)",
    )
    fvd_size: int = Field(224, description="frames squashed to fvd_size x fvd_size (bicubic), scaled to [-1, 1]")
    fvd_frames: int = Field(
        16,
        ge=1,
        description="frames per FVD sample: every clip is cut into non-overlapping "
        "segments of this many frames from its first compared frame, the remainder dropped",
    )
    # -- FID-VID -------------------------------------------------------------------------------
    fid_vid_network: Literal["resnet3d50-kinetics400"] = Field(
        "resnet3d50-kinetics400", description="3-D ResNet-50 (Hara et al., shortcut B) trained on Kinetics-400"
    )
    fid_vid_feature: Literal["avgpool-2048"] = Field(
        "avgpool-2048", description="the 2048 globally pooled features before the classifier"
    )
    fid_vid_size: int = Field(
        112,
        description="frames squashed to fid_vid_size x fid_vid_size (bicubic), 0..255 minus "
        "the Kinetics mean (114.7748, 107.7354, 99.4750)",
    )
    fid_vid_frames: int = Field(16, ge=1, description="frames per FID-VID sample (segments as for FVD)")
    # -- pose accuracy -------------------------------------------------------------------------
    pck_alpha: float = Field(0.1, gt=0, description="a keypoint is correct within pck_alpha x the normaliser")
    pck_normaliser: Literal["bbox-max-side"] = Field(
        "bbox-max-side",
        description="the longer side of the box around the person's found truth keypoints in that frame",
    )
    pck_keypoints: Literal["body"] = Field(
        "body", description="keypoints judged: the 17 COCO body keypoints (COCO-WholeBody 0-16)"
    )
    pck_score_threshold: float = Field(
        0.3,
        ge=0,
        description="a keypoint is found when its score is at least this "
        "(in the truth: judged; in the re-detection: else a miss)",
    )
    # -- identity swaps ------------------------------------------------------------------------
    swap_feature: Literal["image-encoder", "colour-histogram"] = Field(
        "image-encoder",
        description="appearance feature of a person's region: the profile's image encoder when the "
        "caller gives one, else the colour histogram (results name which)",
    )
    swap_hist_bins: int = Field(
        8,
        ge=2,
        description="colour histogram: bins per RGB channel (joint histogram, "
        "compared by the Bhattacharyya coefficient)",
    )
    swap_crop: int = Field(
        224,
        ge=16,
        description="image encoder: the region's box, other pixels grey, squashed to "
        "swap_crop x swap_crop (compared by cosine similarity)",
    )
    swap_min_pixels: int = Field(
        64,
        ge=1,
        description="a person's region smaller than this (in the label map, at the "
        "compared size) is not judged in that frame",
    )
    swap_margin: float = Field(
        0.0,
        ge=0,
        description="a frame is a swap when another person's reference is more "
        "similar than the person's own by more than this",
    )
    # -- background ----------------------------------------------------------------------------
    background_margin_px: int = Field(
        4,
        ge=0,
        description="person masks are grown by this many pixels before taking "
        "the background (halos of generated edges are not background change)",
    )
    # -- seams of long videos ------------------------------------------------------------------
    seam_window_latents: int = Field(
        21,
        ge=2,
        description="latent frames per generation window when a result does "
        "not record its windows (the release's 81-frame windows)",
    )
    seam_overlap_latents: int = Field(4, ge=0, description="latent frames shared by consecutive windows (release)")
    seam_guard_frames: int = Field(
        2, ge=0, description="frame pairs this close to a join are left out of the within-window baseline"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        if self.ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be odd, got {self.ssim_window}")
        if self.seam_overlap_latents >= self.seam_window_latents:
            raise ValueError("seam_overlap_latents must be smaller than seam_window_latents")
        return self

    @property
    def version(self) -> int:
        return PROTOCOL_VERSION

    def digest(self) -> str:
        """16 hex digits of the sha256 of the protocol's values and version (stored with every result)."""
        text = f"{PROTOCOL_VERSION}:{self.model_dump_json()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class EvalNetworks(BaseModel):
    """Local files of the feature networks; None: a seeded tiny random network of the same interface.
    Nothing is ever downloaded (README, "Real weights")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lpips_backbone_path: str | None = Field(
        None,
        description="torchvision ImageNet weights of the LPIPS backbone: "
        "alexnet-owt-7be5be79.pth (or vgg16-397923af.pth)",
    )
    lpips_heads_path: str | None = Field(
        None,
        description="LPIPS v0.1 linear heads: alex.pth (or vgg.pth) from "
        "the lpips package / richzhang/PerceptualSimilarity, lpips/weights/v0.1/",
    )
    fvd_path: str | None = Field(
        None,
        description="I3D Kinetics-400 state dict in pytorch-i3d layout: "
        "i3d_pretrained_400.pt (DisCo's and VideoGPT's FVD file)",
    )
    fid_vid_path: str | None = Field(
        None,
        description="3-D ResNet-50 Kinetics-400 checkpoint: "
        "resnet-50-kinetics.pth (kenshohara/3D-ResNets-PyTorch; DisCo's FID-VID file)",
    )
    tiny_seed: int = Field(0, ge=0, description="seed of the tiny random networks")

    @model_validator(mode="after")
    def _lpips_pair(self) -> EvalNetworks:
        if (self.lpips_backbone_path is None) != (self.lpips_heads_path is None):
            raise ValueError("lpips_backbone_path and lpips_heads_path are given together (or neither: tiny LPIPS)")
        return self

    @property
    def tiny(self) -> bool:
        """True when any network is a tiny random one (its numbers are no scores)."""
        return None in (self.lpips_backbone_path, self.fvd_path, self.fid_vid_path)


class ClipScores(BaseModel):
    """One clip's measures (generated vs its truth): a row of evals/<run>/clips.parquet."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # this record's own layout version (data_schemas.io.schema_version); 1: the first layout
    SCHEMA_VERSION: ClassVar[int] = 1

    clip_id: str = Field(description="the truth clip")
    protocol_version: int = Field(description="PROTOCOL_VERSION the scores were made under")
    protocol_digest: str = Field(description="Protocol.digest() of the protocol used")
    networks: str = Field(
        description="which networks made the scores (feature_nets describe()): 'tiny random' or "
        "the files' sha256 prefixes"
    )
    tiny_networks: bool = Field(description="some network was a tiny random one: the numbers are no scores")
    resampling: str = Field(description="what the conform rule did to each video ('' when nothing)")
    num_frames: int = Field(description="frames compared")
    width: int = Field(description="compared frame width")
    height: int = Field(description="compared frame height")
    fps: float = Field(description="compared frame rate")
    # the paper's measures (per frame, averaged)
    psnr: float | None = Field(description="mean per-frame PSNR in dB (a perfect frame: psnr_max_db)")
    ssim: float | None = Field(description="mean per-frame SSIM")
    lpips: float | None = Field(description="mean per-frame LPIPS (lower = closer)")
    num_video_segments: int = Field(
        description="FVD/FID-VID samples this clip gives (non-overlapping segments); the "
        "distances are over all clips' segments (EvalSummary)"
    )
    # persons
    num_persons: int = Field(description="persons in the truth label map (K)")
    person_psnr: tuple[float | None, ...] = Field(description="per person: PSNR over the person's truth pixels")
    person_ssim: tuple[float | None, ...] = Field(description="per person: mean SSIM map over the person's pixels")
    person_pck: tuple[float | None, ...] = Field(
        description="per person: share of found truth keypoints the "
        "re-detection places within pck_alpha x the normaliser"
    )
    person_pck_keypoints: tuple[int, ...] = Field(description="per person: truth keypoints judged")
    person_swap_rate: tuple[float | None, ...] = Field(
        description="per person: share of judged frames whose "
        "generated region looks most like another person's reference"
    )
    person_swap_frames: tuple[int, ...] = Field(description="per person: frames judged a swap")
    person_judged_frames: tuple[int, ...] = Field(description="per person: frames judged (region large enough)")
    person_swapped_with: tuple[int, ...] = Field(description="per person: the person most often looked like (0: none)")
    swap_feature: str = Field(
        description="appearance feature of the swap measure ('colour-histogram-8', 'image-encoder: ...')"
    )
    swap_persons_a: tuple[int, ...] = Field(description="per swapping pair: the lower-numbered person")
    swap_persons_b: tuple[int, ...] = Field(description="per swapping pair: the other person")
    swap_pair_frames: tuple[int, ...] = Field(
        description="per swapping pair: frames where either looked like the other"
    )
    # clip aggregates
    pck: float | None = Field(description="PCK over all persons' judged keypoints")
    swap_rate: float | None = Field(description="swapped judgements / judgements over all persons")
    background_change: float | None = Field(
        description="generated: mean |frame t - frame t-1| (0..1) over pixels "
        "outside every grown person mask in both frames"
    )
    background_change_truth: float | None = Field(description="the same for the truth on the same pixels")
    seam_joins: tuple[int, ...] = Field(
        description="frames (0-based) where window coverage changes (the jump is between frame j-1 and j)"
    )
    seam_jump: float | None = Field(description="mean frame-to-frame change (0..1) across the joins")
    seam_within: float | None = Field(description="median frame-to-frame change away from the joins")
    seam_drift: float | None = Field(description="seam_jump / seam_within of the generated video (1: no seam)")
    seam_drift_truth: float | None = Field(description="the same ratio on the truth at the same frames")

    @model_validator(mode="after")
    def _consistent(self) -> ClipScores:
        for name in type(self).model_fields:
            if name.startswith("person_") and len(getattr(self, name)) != self.num_persons:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, num_persons is {self.num_persons}")
        pairs = (self.swap_persons_a, self.swap_persons_b, self.swap_pair_frames)
        if len({len(p) for p in pairs}) != 1:
            raise ValueError("swap_persons_a, swap_persons_b and swap_pair_frames must have equal lengths")
        return self

    def persons(self) -> list[PersonScores]:
        """The per-person measures as one record per person (for reports)."""
        names = [n for n in type(self).model_fields if n.startswith("person_")]
        return [
            PersonScores(clip_id=self.clip_id, person=k + 1, **{n[7:]: getattr(self, n)[k] for n in names})
            for k in range(self.num_persons)
        ]


class PersonScores(BaseModel):
    """One person's measures (fields as the ``person_*`` fields of ClipScores)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="the clip")
    person: int = Field(description="label of the person (1-based)")
    psnr: float | None = Field(description="see ClipScores.person_psnr")
    ssim: float | None = Field(description="see ClipScores.person_ssim")
    pck: float | None = Field(description="see ClipScores.person_pck")
    pck_keypoints: int = Field(description="see ClipScores.person_pck_keypoints")
    swap_rate: float | None = Field(description="see ClipScores.person_swap_rate")
    swap_frames: int = Field(description="see ClipScores.person_swap_frames")
    judged_frames: int = Field(description="see ClipScores.person_judged_frames")
    swapped_with: int = Field(description="see ClipScores.person_swapped_with")


class EvalSummary(BaseModel):
    """The measures over a set of clips: the row of evals/<run>/summary.parquet."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    SCHEMA_VERSION: ClassVar[int] = 1

    protocol_version: int = Field(description="PROTOCOL_VERSION the scores were made under")
    protocol_digest: str = Field(description="Protocol.digest() of the protocol used")
    networks: str = Field(description="which networks made the scores")
    tiny_networks: bool = Field(description="some network was a tiny random one: the numbers are no scores")
    num_clips: int = Field(description="clips scored")
    num_video_segments: int = Field(description="FVD/FID-VID samples per side (all clips' segments)")
    psnr: float | None = Field(description="mean of the clips' PSNR")
    ssim: float | None = Field(description="mean of the clips' SSIM")
    lpips: float | None = Field(description="mean of the clips' LPIPS")
    fvd: float | None = Field(
        description="Frechet distance of I3D features, truth vs generated segments (None: fewer than 2 segments a side)"
    )
    fid_vid: float | None = Field(description="Frechet distance of 3-D ResNet-50 features, same segments")
    pck: float | None = Field(description="PCK over every judged keypoint of every clip")
    swap_rate: float | None = Field(description="swapped judgements / judgements over every clip and person")
    swap_features: str = Field(description="the clips' swap features, comma separated")
    background_change: float | None = Field(description="mean of the clips' background_change")
    background_change_truth: float | None = Field(description="mean of the clips' background_change_truth")
    seam_drift: float | None = Field(description="mean seam_drift of the clips that have joins")
    seam_drift_truth: float | None = Field(description="mean seam_drift_truth of the same clips")


class EvalConfig(BaseModel):
    """The profile's ``evaluate:`` section: the protocol, the feature networks' files, and how
    ``multianimate evaluate`` generates each held-out clip (its first frame, poses and label map)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    networks: EvalNetworks = Field(
        default_factory=EvalNetworks, description="local files of LPIPS, I3D (FVD) and 3-D ResNet-50 (FID-VID)"
    )
    protocol: Protocol = Field(
        default_factory=Protocol, description="the protocol's constants (changing one changes the digest)"
    )
    steps: int = Field(50, ge=1, le=1000, description="denoising steps of each generated clip (the release: 50)")
    guidance_scale: float = Field(1.5, ge=1.0, le=20.0, description="classifier-free guidance (the release: 1.5)")
    seed: int = Field(0, ge=0, description="seed of every clip's initial noise")
    max_frames: int = Field(
        81, ge=1, description="frames generated per clip at most; each clip gets the most of the form 4k+1 it has"
    )
    short_side: int | None = Field(
        480,
        ge=16,
        description="generated at the clip's aspect with this shorter side (both sides rounded down to "
        "multiples of 16); None: the clip's own size, rounded down likewise",
    )


EvalStatus = Literal["ok", "missing", "undecodable", "failed"]


class EvalRow(BaseModel):
    """A row of evals/<name>/per_clip.parquet: one per held-out clip (person 0, the clip's measures)
    and one per person of a scored clip (person k, the measures that exist per person)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    SCHEMA_VERSION: ClassVar[int] = 1

    clip_id: str = Field(description="the held-out clip")
    person: int = Field(description="0: the whole clip; k: person k (label k of the truth label map)")
    status: EvalStatus = Field(
        description="ok: scored; missing: no video; undecodable: the video did not decode cleanly; "
        "failed: scoring failed (see reason)"
    )
    reason: str = Field(description="why the clip was not scored ('' when ok)")
    video: str = Field(description="the generated video scored")
    resampling: str = Field(description="what the conform rule did to each video ('' when nothing)")
    protocol_version: int = Field(description="PROTOCOL_VERSION the scores were made under")
    protocol_digest: str = Field(description="Protocol.digest() of the protocol used")
    networks: str = Field(description="which networks made the scores")
    tiny_networks: bool = Field(description="some network was a tiny random one: the numbers are no scores")
    num_frames: int | None = Field(description="frames compared")
    psnr: float | None = Field(description="PSNR in dB (per person: over the person's truth pixels)")
    ssim: float | None = Field(description="SSIM (per person: mean SSIM map over the person's pixels)")
    lpips: float | None = Field(description="LPIPS (clip rows only)")
    pck: float | None = Field(description="PCK of the re-detected poses (None: not measured)")
    swap_rate: float | None = Field(description="identity swap rate")
    swapped_with: int | None = Field(description="person rows: the person most often looked like (0: none)")
    background_change: float | None = Field(description="clip rows: background change of the generated video")
    background_change_truth: float | None = Field(description="clip rows: the same for the truth")
    seam_drift: float | None = Field(description="clip rows: seam jump over within-window change (1: no seam)")
    seam_drift_truth: float | None = Field(description="clip rows: the same ratio on the truth")
