"""Records of the quality measures (preprocess/quality.py) and the filters applied when
writing shards.

``manifests/quality.parquet`` holds one :class:`ClipQuality` row per clip. Persons are
numbered as in the masks' label map: person k (1-based) is label k, and every per-person
tuple (the ``person_*`` fields) holds person k at index k - 1. ``None`` in a measure means
"nothing to measure" (no frames given, a person never visible, no frame pair to compare).

Clip-level aggregates (``min_person_height``, ``min_body_confidence``, ``motion``, ...) are
taken over the *visible persons*: those present in at least ``min_visible_share`` of the
frames, so a passer-by seen in three frames neither counts as a person nor spoils a clip.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_schemas.config import QualityConfig, QualityFilters  # noqa: F401 - the measures' settings live with the other configs


class ClipQuality(BaseModel):
    """One clip's measures: a row of manifests/quality.parquet."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # this record's own layout version (data_schemas.io.schema_version); 1: the first layout
    SCHEMA_VERSION: ClassVar[int] = 1

    clip_id: str = Field(description="the clip measured")
    num_frames: int = Field(description="frames in the clip (T)")
    width: int = Field(description="frame width in pixels")
    height: int = Field(description="frame height in pixels")
    num_persons: int = Field(description="persons tracked in the masks (K)")
    num_visible_persons: int = Field(description="persons present in at least min_visible_share of the frames")
    # persons
    person_counted: tuple[bool, ...] = Field(
        description="per person: present in at least min_visible_share of the frames (counted as a visible person)"
    )
    person_frames_present: tuple[int, ...] = Field(description="per person: frames where the person has mask pixels")
    person_visible_share: tuple[float, ...] = Field(description="per person: frames present / num_frames")
    person_box_height: tuple[float | None, ...] = Field(
        description="per person: mean over present frames of the box height / frame height; the box bounds the "
        "person's pixels and their assigned pose's box (which also covers parts hidden behind others)"
    )
    # pose
    person_body_confidence: tuple[float | None, ...] = Field(
        description="per person: mean score of the 17 body keypoints (COCO-WholeBody 0-16) over present frames, "
        "0 in a frame without an assigned pose"
    )
    person_hands_confidence: tuple[float | None, ...] = Field(
        description="per person: the same for the 42 hand keypoints (91-132)"
    )
    person_feet_confidence: tuple[float | None, ...] = Field(
        description="per person: the same for the 6 foot keypoints (17-22)"
    )
    person_body_present_share: tuple[float | None, ...] = Field(
        description="per person: share of present frames whose assigned pose has min_body_share of the body "
        "keypoints found"
    )
    # masks
    person_mask_stability: tuple[float | None, ...] = Field(
        description="per person: mean IoU of the mask with the previous frame's, over frame pairs where the person "
        "is present in both (camera cuts excluded)"
    )
    person_area_share: tuple[float | None, ...] = Field(
        description="per person: mean over present frames of mask pixels / frame pixels"
    )
    person_occlusion_share: tuple[float | None, ...] = Field(
        description="per person: mean over present frames of the share of the person's box covered by other "
        "persons' pixels (a label map has no overlaps, so occlusion shows as others' pixels in one's box)"
    )
    person_pose_mask_disagreements: tuple[int, ...] = Field(
        description="per person: frames where fewer than disagreement_share of the assigned pose's found body "
        "keypoints lie inside the person's mask"
    )
    # motion
    person_speed: tuple[float | None, ...] = Field(
        description="per person: mean body keypoint displacement between consecutive frames, pixels per frame / "
        "frame height (keypoints found in both frames; camera cuts and the person's identity switches excluded)"
    )
    # identity
    num_identity_switches: int = Field(description="suspected identity switches (one per frame and pair of persons)")
    switch_frames: tuple[int, ...] = Field(description="per switch: the first frame (0-based) after it")
    switch_persons_a: tuple[int, ...] = Field(description="per switch: the lower-numbered person involved")
    switch_persons_b: tuple[int, ...] = Field(description="per switch: the other person involved")
    switch_evidence: tuple[str, ...] = Field(
        description="per switch: 'mask', 'pose' or 'mask+pose' (the rules that fired)"
    )
    num_disagreement_frames: int = Field(description="frames where some person's pose and mask disagree")
    # clip aggregates over the visible persons
    min_person_height: float | None = Field(description="smallest person_box_height of a visible person")
    min_body_confidence: float | None = Field(description="lowest person_body_confidence of a visible person")
    min_mask_stability: float | None = Field(description="lowest person_mask_stability of a visible person")
    max_occlusion_share: float | None = Field(description="highest person_occlusion_share of a visible person")
    motion: float | None = Field(description="highest person_speed of a visible person (0 when nobody moves)")
    camera_cuts: tuple[int, ...] = Field(description="frames (0-based) that start a new shot inside the clip")
    # image
    frames_measured: int = Field(description="frames read for the image measures (0 when no frames were given)")
    blur: float | None = Field(description="mean variance of the grey frames' Laplacian (lower = blurrier)")
    brightness: float | None = Field(description="mean grey level of the frames, 0..1")

    @model_validator(mode="after")
    def _consistent(self) -> ClipQuality:
        for name in type(self).model_fields:
            if name.startswith("person_") and len(getattr(self, name)) != self.num_persons:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, num_persons is {self.num_persons}")
        switches = (self.switch_frames, self.switch_persons_a, self.switch_persons_b, self.switch_evidence)
        if any(len(s) != self.num_identity_switches for s in switches):
            raise ValueError(f"switch_* fields must have num_identity_switches ({self.num_identity_switches}) entries")
        return self

    def persons(self) -> list[PersonQuality]:
        """The per-person measures as one record per person (for reports)."""
        names = [n for n in type(self).model_fields if n.startswith("person_")]
        return [
            PersonQuality(clip_id=self.clip_id, person=k + 1, **{n[7:]: getattr(self, n)[k] for n in names})
            for k in range(self.num_persons)
        ]


class PersonQuality(BaseModel):
    """One person's measures (fields as the ``person_*`` fields of ClipQuality)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_id: str = Field(description="the clip")
    person: int = Field(description="label of the person in the masks (1-based)")
    counted: bool = Field(description="see ClipQuality.person_counted")
    frames_present: int = Field(description="see ClipQuality.person_frames_present")
    visible_share: float = Field(description="see ClipQuality.person_visible_share")
    box_height: float | None = Field(description="see ClipQuality.person_box_height")
    body_confidence: float | None = Field(description="see ClipQuality.person_body_confidence")
    hands_confidence: float | None = Field(description="see ClipQuality.person_hands_confidence")
    feet_confidence: float | None = Field(description="see ClipQuality.person_feet_confidence")
    body_present_share: float | None = Field(description="see ClipQuality.person_body_present_share")
    mask_stability: float | None = Field(description="see ClipQuality.person_mask_stability")
    area_share: float | None = Field(description="see ClipQuality.person_area_share")
    occlusion_share: float | None = Field(description="see ClipQuality.person_occlusion_share")
    pose_mask_disagreements: int = Field(description="see ClipQuality.person_pose_mask_disagreements")
    speed: float | None = Field(description="see ClipQuality.person_speed")
