"""Processors of the Qwen-VL families that write exactly as many placeholders as the compressed model consumes.

Shipped with checkpoints: imports only torch, numpy, transformers and flat siblings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
# Qwen2-VL's resize target (multiples of patch·merge, area within the pixel bounds), from the PIL image processor:
# the torchvision-free module, the same function the video processor uses.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import make_batched_videos

from .configuration_qwen_vl import qwen_token_count
from .configuration_slimvlm import normalize_compression
from .voco import VOCO_TOKEN


# Qwen2VLVideoProcessor's defaults: per-frame pixel bounds, and the fps it assumes for frames without metadata.
QWEN_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
QWEN_DEFAULT_FPS = 24


def video_frames(video) -> torch.Tensor:
    """One video (PIL frames, [F, H, W, 3] / [F, 3, H, W] array or tensor, or a list of frames) -> [F, 3, H, W] float32."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame) for frame in video])
    frames = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    if frames.ndim != 4:
        raise ValueError(f"a video must be 4-D (frames, height, width, channels) or (frames, channels, height, width); "
                         f"got shape {tuple(frames.shape)}")
    if frames.shape[-1] in (1, 3) and frames.shape[1] not in (1, 3):
        frames = frames.permute(0, 3, 1, 2)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    return frames.float()


class QwenFrameVideoProcessor:
    """Qwen2-VL / Qwen2.5-VL video preprocessing without torchvision, the same math as `Qwen2VLVideoProcessor`.

    Per video: smart_resize of the frame size (factor patch·merge, `size` pixel bounds), bicubic antialiased resize
    in float32 (torchvision's kernel for uint8 frames: `interpolate(..., antialias=True)`, clamp to 0..255, round),
    fused rescale + normalise ((x - 255·mean) / (255·std)), the last frame repeated to an even count, and the
    stock patch order (t, merge blocks row-major, 2 x 2 inside; channel, temporal, patch rows, patch columns).
    Returns `pixel_values_videos` [Σ t·gh·gw, 3·2·p²] and `video_grid_thw` [videos, 3].
    """

    def __init__(self, size: dict | None = None, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
        self.size = dict(size or QWEN_VIDEO_SIZE)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, gh, gw) of a video of num_frames frames of height x width."""
        resized_h, resized_w = smart_resize(height, width, self.patch_size * self.merge_size, self.size["shortest_edge"],
                                            self.size["longest_edge"])
        return -(-num_frames // self.temporal_patch_size), resized_h // self.patch_size, resized_w // self.patch_size

    def preprocess_one(self, video) -> tuple[torch.Tensor, list[int]]:
        frames = video_frames(video)
        steps, grid_h, grid_w = self.grid(frames.shape[0], frames.shape[2], frames.shape[3])
        size = (grid_h * self.patch_size, grid_w * self.patch_size)
        frames = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
        frames = frames.clamp_(0, 255).round_()
        mean = torch.tensor(self.image_mean) * 255.0
        std = torch.tensor(self.image_std) * 255.0
        frames = (frames - mean[:, None, None]) / std[:, None, None]
        if pad := -frames.shape[0] % self.temporal_patch_size:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        m, p, tp = self.merge_size, self.patch_size, self.temporal_patch_size
        patches = frames.view(steps, tp, 3, grid_h // m, m, p, grid_w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(steps * grid_h * grid_w, 3 * tp * p * p), [steps, grid_h, grid_w]

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        processed = [self.preprocess_one(video) for video in make_batched_videos(videos)]
        return BatchFeature({"pixel_values_videos": torch.cat([pixels for pixels, _ in processed]),
                             "video_grid_thw": torch.tensor([grid for _, grid in processed])}, tensor_type=return_tensors)


class QwenCompressionProcessorMixin:
    """`compression` (saved in processor_config.json) and the compressed placeholder counts."""

    def set_compression(self, compression: dict | None):
        """Switch compression (must match the model's); returns self."""
        self.compression = normalize_compression(compression, ratios=True)
        return self

    def _tokens(self, grid_thw) -> int:
        return qwen_token_count(self.compression, grid_thw, self.image_processor.merge_size)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """Under VoCo the K `<voco>` tokens follow each image's `<|vision_end|>` (spec §6.2), written here."""
        if self.compression["method"] == "voco" and text is not None:
            image_block = f"{self.image_token}<|vision_end|>"
            group = image_block + VOCO_TOKEN * self.compression["num_voco_tokens"]
            text = [sample.replace(image_block, group) for sample in ([text] if isinstance(text, str) else text)]
        return super().__call__(images=images, text=text, videos=videos, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self._tokens(image_inputs["image_grid_thw"][image_idx])

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * self._tokens(video_inputs["video_grid_thw"][video_idx])

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if video_sizes is not None:
            data.num_video_tokens = [self._tokens(self.video_processor.grid(*video_size)) for video_size in video_sizes]
        if self.compression["method"] != "visionzip":
            return data
        if image_sizes is not None:
            # An image is t·gh·gw patches with t = 1 (the processor duplicates it over the temporal patch).
            given = {key: value for key, value in self._merge_kwargs(**kwargs).get("images_kwargs", {}).items()
                     if value is not None}
            data.num_image_tokens = [self._tokens((1, *self._image_grid(height, width, given)))
                                     for height, width in image_sizes]
        return data

    def _image_grid(self, height: int, width: int, images_kwargs: dict) -> tuple[int, int]:
        """(gh, gw) of an image of height x width: the image processor's smart_resize (this call's `size`,
        `patch_size`, `merge_size` first, else the image processor's), in patches."""
        processor = self.image_processor
        patch = images_kwargs.get("patch_size") or processor.patch_size
        merge = images_kwargs.get("merge_size") or processor.merge_size
        size = images_kwargs.get("size") or processor.size
        bounds = [size[key] if isinstance(size, dict) else getattr(size, key) for key in ("shortest_edge", "longest_edge")]
        resized_h, resized_w = smart_resize(height, width, patch * merge, *bounds)
        return resized_h // patch, resized_w // patch


class SlimQwen2_5_VLProcessor(QwenCompressionProcessorMixin, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` whose placeholder counts follow `compression` (the model's `config.compression`):
    under VisionZip an image of n merged tokens gets `sum(visionzip_counts(n, ρ_d, ρ_c))` placeholders, a video
    that per temporal step."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, compression: dict | None = None,
                 video_size: dict | None = None, video_fps: float | None = None, **kwargs):
        # The stock __init__ minus its `video_processor` sub-processor (transformers' video processors need
        # torchvision): videos go through `video_processor`, a torchvision-free frame preprocessing.
        kwargs.pop("video_processor", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        self.video_size = dict(video_size or QWEN_VIDEO_SIZE)
        self.video_fps = video_fps
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.set_compression(compression)

    @property
    def video_processor(self) -> QwenFrameVideoProcessor:
        """The frames' preprocessing (torchvision-free, `QwenFrameVideoProcessor`), with `video_size` pixel bounds
        and the image processor's patch sizes, mean and std."""
        image = self.image_processor
        return QwenFrameVideoProcessor(self.video_size, image.patch_size, image.temporal_patch_size, image.merge_size,
                                       image.image_mean, image.image_std)

    def _process_videos(self, videos, fps: float | None = None, **kwargs):
        """Frames -> pixels and grids, `video_size` placeholders per video and `second_per_grid_ts` = 2 / fps
        (fps: this call's `fps`, else `video_fps`, else 24 as the stock processor assumes for bare frames)."""
        processed = self.video_processor(videos)
        replacements = [self.replace_video_token(processed, index) for index in range(len(processed["video_grid_thw"]))]
        fps = fps or self.video_fps or QWEN_DEFAULT_FPS
        processed["second_per_grid_ts"] = [self.video_processor.temporal_patch_size / fps] * len(replacements)
        return processed, replacements


class SlimQwen3VLProcessor(QwenCompressionProcessorMixin, Qwen3VLProcessor):
    """`Qwen3VLProcessor` whose image placeholder counts follow `compression`. Images only: Qwen3-VL's video
    preprocessing (per-frame timestamps, joint frame budget) needs transformers' torchvision video processor and
    is not reproduced here, so videos raise."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, compression: dict | None = None,
                 **kwargs):
        kwargs.pop("video_processor", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        self.set_compression(compression)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            self._process_videos(videos)
        return super().__call__(images=images, text=text, videos=None, **kwargs)

    def _process_videos(self, videos, **kwargs):
        raise ValueError("SlimQwen3VLProcessor takes images only: Qwen3-VL video preprocessing needs transformers' "
                         "torchvision video processor; pass pixel_values_videos / video_grid_thw you built yourself "
                         "(one placeholder group per frame group, as the stock processor writes)")


SlimQwen2_5_VLProcessor.register_for_auto_class("AutoProcessor")
SlimQwen3VLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["QwenFrameVideoProcessor", "SlimQwen2_5_VLProcessor", "SlimQwen3VLProcessor"]
