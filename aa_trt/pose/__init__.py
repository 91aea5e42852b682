"""Pose: extraction backends, alignment to the reference, rendering in DWPose's style."""
from aa_trt.pose.keypoints import BODY, BODY_NAMES, HAND_EDGES, LIMBS, Pose

__all__ = ["Pose", "BODY", "BODY_NAMES", "LIMBS", "HAND_EDGES"]
