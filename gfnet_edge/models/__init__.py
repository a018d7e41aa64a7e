"""PyTorch side of gfnet-edge: the reference GFNet, its checkpoints and cost counting.

Importing this package needs torch (and timm/torchvision for the backbones); the device-side
runtime never imports it.
"""
from .backbones import Encoder
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_dict, save_checkpoint
from .gfnet import GFNet, Trace, action_to_coords, build_gfnet, crop_patches, glance_input
from .heads import Classifier, Policy
from .macs import StepCosts, count_static_macs, count_step_macs

__all__ = [
    "Encoder", "CheckpointError", "load_checkpoint", "read_checkpoint_dict", "save_checkpoint",
    "GFNet", "Trace", "action_to_coords", "build_gfnet", "crop_patches", "glance_input",
    "Classifier", "Policy", "StepCosts", "count_static_macs", "count_step_macs",
]
