"""Backbones per family behind one interface: loading, encoders, prediction, LoRA, reference toggle."""

from diffalign.models.backbone import Backbone
from diffalign.models.base import Conditioning
from diffalign.models.flux import FluxBackbone
from diffalign.models.loading import (
           FAMILIES,
           check_model,
           detect_family,
           load_backbone,
           resolve_pretrained,
)
from diffalign.models.qwen_image import QwenImageBackbone
from diffalign.models.sd import SDBackbone
from diffalign.models.sd3 import SD3Backbone
from diffalign.models.sdxl import SDXLBackbone
from diffalign.models.video import VideoBackbone, WanBackbone
from diffalign.models.z_image import ZImageBackbone

__all__ = ["FAMILIES", "Backbone", "Conditioning", "FluxBackbone", "QwenImageBackbone", "SD3Backbone", "SDBackbone",
           "SDXLBackbone", "VideoBackbone", "WanBackbone", "ZImageBackbone", "check_model", "detect_family",
           "load_backbone", "resolve_pretrained"]
