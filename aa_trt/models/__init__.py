"""aa-trt's own networks (the UNet family, motion modules, PoseGuider) and the reference K/V cache."""
from .pose_guider import PoseGuider
from .reference_kv import ReferenceKV, compute_reference_kv, project_banks
from .unet import UNet

__all__ = ["UNet", "PoseGuider", "ReferenceKV", "compute_reference_kv", "project_banks"]
