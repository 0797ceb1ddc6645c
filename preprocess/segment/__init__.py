"""Per-person segmentation and tracking: SAM2 masklets, stable identities, pose assignment."""
