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
    onevision_visionzip_image_tokens,
    onevision_visionzip_video_tokens,
)
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
    """OneVision's video preprocessing without torchvision: the stock `LlavaOnevisionVideoProcessor` math.

    Per frame: RGB; resize to `size` (height, width) with bicubic antialiased interpolation on the uint8 frame
    (computed in float32, clamped to [0, 255] and rounded back to uint8, as torchvision resizes uint8 tensors);
    then (x - mean / r) / (std / r) in float32 (the fused rescale by r = `rescale_factor` and normalisation).
    No frame sampling (the stock default `do_sample_frames=False`). Returns `pixel_values_videos` [videos, F, 3, H, W].
    """

    def __init__(self, size: tuple[int, int] = (384, 384), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 rescale_factor: float = 1 / 255):
        self.size = tuple(size)
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.rescale_factor = rescale_factor

    @classmethod
    def from_image_processor(cls, image_processor) -> "OnevisionFrameProcessor":
        """Frames at the image processor's view size, mean, std and rescale factor."""
        size = image_processor.size
        side = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        return cls(side, image_processor.image_mean, image_processor.image_std, image_processor.rescale_factor)

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None] / self.rescale_factor
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None] / self.rescale_factor
        processed = []
        for video in make_batched_videos(videos):
            frames = video_frames_tensor(video).float()
            frames = F.interpolate(frames, size=self.size, mode="bicubic", align_corners=False, antialias=True)
            frames = frames.clamp_(0, 255).round_()
            processed.append((frames - mean) / std)
        if len({tuple(video.shape) for video in processed}) > 1:
            raise ValueError(f"videos in one batch need the same number of frames; got {[v.shape[0] for v in processed]}")
        return BatchFeature({"pixel_values_videos": torch.stack(processed)}, tensor_type=return_tensors)


class SlimLlavaOnevisionProcessor(SlimProcessorMixin, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` whose placeholder counts follow `compression`, with torchvision-free video frames.

    Under VisionZip (K = dominant + contextual per SigLIP view, K_f = video_dominant + video_contextual per frame):
    a single image becomes (1 + gh·gw)·K tokens, an image of a multi-image sample K + 1, a video of F frames
    F·K_f + 1. Other methods keep the stock counts; under VoCo every image or video block is followed by its
    group of `<voco>` tokens.
    """

    takes_videos = ONEVISION_VIDEO_SPLIT

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 compression: dict | None = None, **kwargs):
        kwargs.pop("video_processor", None)  # frames go through `OnevisionFrameProcessor` (no torchvision)
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.set_compression(compression)

    @property
    def video_processor(self) -> OnevisionFrameProcessor:
        """The frames' preprocessing (`OnevisionFrameProcessor` at the image processor's size, mean and std)."""
        return OnevisionFrameProcessor.from_image_processor(self.image_processor)

    def _tokens_per_view(self) -> int | None:
        return self.num_image_tokens  # SigLIP: patches only

    def _grid(self, orig_height: int, orig_width: int, height: int, width: int) -> tuple[int, int]:
        best_height, best_width = select_best_resolution([orig_height, orig_width], self.image_processor.image_grid_pinpoints)
        return best_height // height, best_width // width

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        if self.compression["method"] != "visionzip":
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        return onevision_visionzip_image_tokens(self.compression, self._grid(orig_height, orig_width, height, width))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.compression["method"] == "visionzip" and not self._single_image(image_inputs, image_idx):
            return self.image_token * onevision_visionzip_image_tokens(self.compression, None)
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
        if self.compression["method"] == "visionzip":
            frames = video_inputs["pixel_values_videos"][video_idx].shape[0]
            return self.video_token * onevision_visionzip_video_tokens(self.compression, frames)
        return self._with_voco_group(super().replace_video_token(video_inputs, video_idx, **kwargs))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if self.compression["method"] == "visionzip" and video_sizes is not None:
            data.num_video_tokens = [onevision_visionzip_video_tokens(self.compression, frames)
                                     for frames, _, _ in video_sizes]
        return data


SlimLlavaOnevisionProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["OnevisionFrameProcessor", "SlimLlavaOnevisionProcessor"]
