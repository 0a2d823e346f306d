"""Backbones per family behind one interface: loading, encoders, prediction, LoRA, reference toggle."""

from diffalign.models.backbone import (
    FAMILIES,
    Backbone,
    SD3Backbone,
    SDBackbone,
    SDXLBackbone,
    detect_family,
    load_backbone,
)
from diffalign.models.base import Conditioning

__all__ = ["FAMILIES", "Backbone", "Conditioning", "SD3Backbone", "SDBackbone", "SDXLBackbone", "detect_family",
           "load_backbone"]
