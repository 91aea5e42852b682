"""aa-trt's own networks (the UNet family, motion modules, PoseGuider) and the reference K/V cache."""
from aa_trt.models.pose_guider import PoseGuider
from aa_trt.models.reference_kv import ReferenceKV, compute_reference_kv, project_banks
from aa_trt.models.unet import UNet

__all__ = ["UNet", "PoseGuider", "ReferenceKV", "compute_reference_kv", "project_banks"]
