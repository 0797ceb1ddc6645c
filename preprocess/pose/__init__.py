"""Pose stage: DWPose whole-body keypoints -> OpenPose-style frames -> pose images."""
