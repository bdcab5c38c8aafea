"""SlimVLM: visual-token compression (VisionZip, SparseVLM, VoCo-LLaMA) as native transformers classes.

Importing slimvlm registers the Slim classes with AutoConfig, AutoModel, AutoModelForImageTextToText and
AutoProcessor. This module is not shipped with checkpoints; the flat modules it imports are.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_slimvlm import SlimLlavaConfig, normalize_compression, split_visionzip_tokens
from .modeling_llava import DEFAULT_QUANTIZATION_SKIP_MODULES, SlimLlavaForConditionalGeneration, SlimLlavaModel
from .processing_slimvlm import SlimLlavaProcessor
from .voco import VoCoCache, VoCoDataCollator, add_voco_token, build_voco_prompt, build_voco_text_prompt, freeze_vision_tower

__version__ = "0.1.0"

AutoConfig.register(SlimLlavaConfig.model_type, SlimLlavaConfig, exist_ok=True)
AutoModel.register(SlimLlavaConfig, SlimLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(SlimLlavaConfig, SlimLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SlimLlavaConfig, SlimLlavaProcessor, exist_ok=True)

__all__ = [
    "DEFAULT_QUANTIZATION_SKIP_MODULES",
    "SlimLlavaConfig",
    "SlimLlavaForConditionalGeneration",
    "SlimLlavaModel",
    "SlimLlavaProcessor",
    "VoCoCache",
    "VoCoDataCollator",
    "add_voco_token",
    "build_voco_prompt",
    "build_voco_text_prompt",
    "freeze_vision_tower",
    "normalize_compression",
    "split_visionzip_tokens",
]
