"""SlimVLM: visual-token compression (VisionZip, SparseVLM, VoCo-LLaMA) as native transformers classes.

Importing slimvlm registers the Slim classes with AutoConfig, AutoModel, AutoModelForImageTextToText and
AutoProcessor. This module is not shipped with checkpoints; the flat modules it imports are.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_slimvlm import (
    SlimLlavaConfig,
    SlimLlavaNextConfig,
    SlimMiniGeminiConfig,
    SlimVideoLlavaConfig,
    normalize_compression,
    split_visionzip_tokens,
)
from .modeling_llava import DEFAULT_QUANTIZATION_SKIP_MODULES, SlimLlavaForConditionalGeneration, SlimLlavaModel
from .modeling_llava_next import SlimLlavaNextForConditionalGeneration, SlimLlavaNextModel
from .modeling_mini_gemini import SlimMiniGeminiForConditionalGeneration, SlimMiniGeminiModel
from .modeling_video_llava import SlimVideoLlavaForConditionalGeneration, SlimVideoLlavaModel
from .configuration_llava_onevision import SlimLlavaOnevisionConfig
from .modeling_llava_onevision import SlimLlavaOnevisionForConditionalGeneration, SlimLlavaOnevisionModel
from .processing_llava_onevision import SlimLlavaOnevisionProcessor
from .processing_slimvlm import SlimLlavaNextProcessor, SlimLlavaProcessor, SlimMiniGeminiProcessor, SlimVideoLlavaProcessor
from .configuration_qwen_vl import SlimQwen2_5_VLConfig, SlimQwen3VLConfig
from .modeling_qwen2_5_vl import SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLModel
from .modeling_qwen3_vl import SlimQwen3VLForConditionalGeneration, SlimQwen3VLModel
from .processing_qwen_vl import SlimQwen2_5_VLProcessor, SlimQwen3VLProcessor
from .auto import AutoSlimModel, AutoSlimProcessor
from .voco import VoCoCache, VoCoDataCollator, add_voco_token, build_voco_prompt, build_voco_text_prompt, freeze_vision_tower

__version__ = "0.1.0"

FAMILIES = (
    (SlimLlavaConfig, SlimLlavaModel, SlimLlavaForConditionalGeneration, SlimLlavaProcessor),
    (SlimLlavaNextConfig, SlimLlavaNextModel, SlimLlavaNextForConditionalGeneration, SlimLlavaNextProcessor),
    (SlimMiniGeminiConfig, SlimMiniGeminiModel, SlimMiniGeminiForConditionalGeneration, SlimMiniGeminiProcessor),
    (SlimVideoLlavaConfig, SlimVideoLlavaModel, SlimVideoLlavaForConditionalGeneration, SlimVideoLlavaProcessor),
    (SlimLlavaOnevisionConfig, SlimLlavaOnevisionModel, SlimLlavaOnevisionForConditionalGeneration,
     SlimLlavaOnevisionProcessor),
    (SlimQwen2_5_VLConfig, SlimQwen2_5_VLModel, SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor),
    (SlimQwen3VLConfig, SlimQwen3VLModel, SlimQwen3VLForConditionalGeneration, SlimQwen3VLProcessor),
)
for _config, _model, _generation, _processor in FAMILIES:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _generation, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)

__all__ = [
    "AutoSlimModel",
    "AutoSlimProcessor",
    "DEFAULT_QUANTIZATION_SKIP_MODULES",
    "SlimLlavaConfig",
    "SlimLlavaForConditionalGeneration",
    "SlimLlavaModel",
    "SlimLlavaNextConfig",
    "SlimLlavaNextForConditionalGeneration",
    "SlimLlavaNextModel",
    "SlimLlavaNextProcessor",
    "SlimLlavaOnevisionConfig",
    "SlimLlavaOnevisionForConditionalGeneration",
    "SlimLlavaOnevisionModel",
    "SlimLlavaOnevisionProcessor",
    "SlimLlavaProcessor",
    "SlimMiniGeminiConfig",
    "SlimMiniGeminiForConditionalGeneration",
    "SlimMiniGeminiModel",
    "SlimMiniGeminiProcessor",
    "SlimQwen2_5_VLConfig",
    "SlimQwen2_5_VLForConditionalGeneration",
    "SlimQwen2_5_VLModel",
    "SlimQwen2_5_VLProcessor",
    "SlimQwen3VLConfig",
    "SlimQwen3VLForConditionalGeneration",
    "SlimQwen3VLModel",
    "SlimQwen3VLProcessor",
    "SlimVideoLlavaConfig",
    "SlimVideoLlavaForConditionalGeneration",
    "SlimVideoLlavaModel",
    "SlimVideoLlavaProcessor",
    "VoCoCache",
    "VoCoDataCollator",
    "add_voco_token",
    "build_voco_prompt",
    "build_voco_text_prompt",
    "freeze_vision_tower",
    "normalize_compression",
    "split_visionzip_tokens",
]
