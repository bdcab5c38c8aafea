"""Conversions and exports (not shipped with checkpoints; may import slimvlm)."""

from .voco_export import apply_voco_delta, export_voco_weights, load_voco_weights
from .voco_official import convert_official_config, convert_official_state_dict

__all__ = ["apply_voco_delta", "convert_official_config", "convert_official_state_dict", "export_voco_weights",
           "load_voco_weights"]
