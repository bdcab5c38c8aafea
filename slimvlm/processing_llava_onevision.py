"""LLaVA-OneVision's Slim processor: as many placeholders as the compressed model consumes, and video frames
without torchvision.

Shipped with checkpoints: imports only torch, numpy, transformers and flat siblings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, LlavaOnevisionProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.video_utils import make_batched_videos

from .configuration_llava_onevision import (
    ONEVISION_VIDEO_SPLIT,
    check_onevision_pruner,
    onevision_visionzip_image_tokens,
    onevision_visionzip_video_tokens,
)
from .configuration_slimvlm import normalize_compression
from .processing_slimvlm import SlimProcessorMixin
from .voco import voco_group_text


def video_frames_tensor(video) -> torch.Tensor:
    """One video (a list of PIL frames or [H, W, 3] arrays, an array / tensor [F, H, W, 3] or [F, 3, H, W]) as a
    uint8 tensor [F, 3, H, W] (RGB; an alpha channel is dropped, grayscale is repeated)."""
    frames = []
    for frame in video:
        if hasattr(frame, "convert"):  # PIL
            frame = np.asarray(frame.convert("RGB"))
        frame = torch.as_tensor(np.asarray(frame))
        if frame.dim() == 2:
            frame = frame[..., None].expand(-1, -1, 3)
        if frame.shape[0] in (1, 3, 4) and frame.shape[-1] not in (1, 3, 4):
            frame = frame.permute(1, 2, 0)  # channels first -> last
        if frame.shape[-1] == 1:
            frame = frame.expand(-1, -1, 3)
        frames.append(frame[..., :3].permute(2, 0, 1))
    return torch.stack(frames)


class OnevisionFrameProcessor:
    """OneVision's video preprocessing without torchvision: what the stock `LlavaOnevisionVideoProcessor` computes
    on the CPU.

    Per frame: RGB; resize the uint8 frame to `size` (height, width) with antialiased bicubic interpolation on
    uint8 (torchvision's CPU kernel for uint8 bicubic is torch's native uint8 `interpolate`; a frame already at
    `size` is left as it is); then the fused rescale and normalisation in float32, (x - mean/r) / (std/r) with
    r = `rescale_factor`. No frame sampling (the stock default `do_sample_frames=False`).
    Returns `pixel_values_videos` [videos, F, 3, H, W].
    """

    def __init__(self, size: tuple[int, int] = (384, 384), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 rescale_factor: float = 1 / 255):
        self.size = tuple(size)
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.rescale_factor = rescale_factor

    @classmethod
    def from_settings(cls, settings: dict) -> "OnevisionFrameProcessor":
        """From a video preprocessor config's fields (`size`, `image_mean`, `image_std`, `rescale_factor`)."""
        size = settings.get("size") or {"height": 384, "width": 384}
        if isinstance(size, dict):
            size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        unknown = sorted(set(settings) - {"size", "image_mean", "image_std", "rescale_factor"})
        if unknown:
            raise ValueError(f"video_preprocessing has unknown key(s) {unknown}; allowed: size, image_mean, image_std, "
                             "rescale_factor")
        return cls(tuple(size), settings.get("image_mean", (0.5,) * 3), settings.get("image_std", (0.5,) * 3),
                   settings.get("rescale_factor", 1 / 255))

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None] * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None] * (1.0 / self.rescale_factor)
        processed = []
        for video in make_batched_videos(videos):
            frames = video_frames_tensor(video)
            if frames.dtype != torch.uint8:
                raise TypeError(f"video frames must be uint8 (0-255) PIL images, arrays or tensors, got {frames.dtype}")
            if tuple(frames.shape[-2:]) != self.size:
                frames = F.interpolate(frames, size=self.size, mode="bicubic", align_corners=False, antialias=True)
            processed.append((frames.float() - mean) / std)
        if len({tuple(video.shape) for video in processed}) > 1:
            raise ValueError(f"videos in one batch need the same number of frames; got {[v.shape[0] for v in processed]}")
        return BatchFeature({"pixel_values_videos": torch.stack(processed)}, tensor_type=return_tensors)


class SlimLlavaOnevisionProcessor(SlimProcessorMixin, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` whose placeholder counts follow `compression`, with torchvision-free video frames.

    Under VisionZip (K = dominant + contextual per SigLIP view, K_f = video_dominant + video_contextual per frame):
    a single image becomes (1 + gh·gw)·K tokens, an image of a multi-image sample K + 1, a video of F frames
    F·K_f + 1. CDPruner / DivPrune: K of each view's (frame's) patches, so (1 + gh·gw)·K, K + 1 and F·K + 1
    as well, plus the instruction's `relevance_input_ids` (`relevance_video_*`) under CDPruner. Other methods keep the stock counts; under VoCo every image or video block is followed by its
    group of `<voco>` tokens.
    """

    takes_videos = ONEVISION_VIDEO_SPLIT

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 compression: dict | None = None, video_preprocessing: dict | None = None, **kwargs):
        kwargs.pop("video_processor", None)  # frames go through `OnevisionFrameProcessor` (no torchvision)
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        if video_preprocessing is None and image_processor is not None:  # the image processor's view size, mean, std
            video_preprocessing = {"size": dict(image_processor.size), "image_mean": list(image_processor.image_mean),
                                   "image_std": list(image_processor.image_std),
                                   "rescale_factor": image_processor.rescale_factor}
        self.video_preprocessing = video_preprocessing
        OnevisionFrameProcessor.from_settings(video_preprocessing or {})  # validated now, not at the first video
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.set_compression(compression)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`; a stock folder's `video_preprocessor_config.json` (size, mean, std,
        rescale factor) sets the frames' preprocessing unless `video_preprocessing` is given or saved."""
        if "video_preprocessing" not in kwargs:
            from transformers.utils import cached_file

            hub = {key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if key in kwargs}
            found = cached_file(pretrained_model_name_or_path, "video_preprocessor_config.json",
                                _raise_exceptions_for_missing_entries=False, **hub)
            if found is not None:
                import json

                with open(found) as handle:
                    settings = json.load(handle)
                kwargs["video_preprocessing"] = {key: settings[key] for key in
                                                 ("size", "image_mean", "image_std", "rescale_factor") if key in settings}
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def video_processor(self) -> OnevisionFrameProcessor:
        """The frames' preprocessing (`OnevisionFrameProcessor` with `video_preprocessing`)."""
        return OnevisionFrameProcessor.from_settings(self.video_preprocessing or {})

    def set_compression(self, compression: dict | None):
        """Switch compression (must match the model's); returns self. CDPruner / DivPrune: as the config refuses."""
        self.compression = normalize_compression(compression, self._tokens_per_view(), video=self.takes_videos,
                                                 default_scope=self.pruner_default_scope, relevance_encoder=None,
                                                 view_has_cls=False)  # SigLIP: every patch is a candidate
        check_onevision_pruner(self.compression)
        return self

    def _tokens_per_view(self) -> int | None:
        return self.num_image_tokens  # SigLIP: patches only

    def _vision_side(self) -> bool:
        return self.compression["method"] in ("visionzip", "cdpruner", "divprune")


    def _grid(self, orig_height: int, orig_width: int, height: int, width: int) -> tuple[int, int]:
        best_height, best_width = select_best_resolution([orig_height, orig_width], self.image_processor.image_grid_pinpoints)
        return best_height // height, best_width // width

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        if not self._vision_side():
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        return onevision_visionzip_image_tokens(self.compression, self._grid(orig_height, orig_width, height, width),
                                                self.num_image_tokens)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self._vision_side() and not self._single_image(image_inputs, image_idx):
            return self.image_token * onevision_visionzip_image_tokens(self.compression, None, self.num_image_tokens)
        return self._with_voco_group(super().replace_image_token(image_inputs, image_idx, **kwargs))

    @staticmethod
    def _single_image(image_inputs: dict, image_idx: int) -> bool:
        seen = 0
        for count in image_inputs["batch_num_images"]:
            if image_idx < seen + count:
                return count == 1
            seen += count
        return True

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if self._vision_side():
            frames = video_inputs["pixel_values_videos"][video_idx].shape[0]
            return self.video_token * onevision_visionzip_video_tokens(self.compression, frames, self.num_image_tokens)
        return self._with_voco_group(super().replace_video_token(video_inputs, video_idx, **kwargs))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if self._vision_side() and video_sizes is not None:
            data.num_video_tokens = [onevision_visionzip_video_tokens(self.compression, frames, self.num_image_tokens)
                                     for frames, _, _ in video_sizes]
        return data


SlimLlavaOnevisionProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["OnevisionFrameProcessor", "SlimLlavaOnevisionProcessor"]
