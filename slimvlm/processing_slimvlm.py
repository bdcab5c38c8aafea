"""Processors that write exactly as many image placeholders as the compressed model consumes.

Shipped with checkpoints: imports only transformers and flat siblings.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, LlavaNextProcessor, LlavaProcessor, VideoLlavaProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import logging
from transformers.video_utils import make_batched_videos

from .cdpruner import clip_text_rows

from .configuration_slimvlm import (
    anyres_visionzip_token_count,
    image_token_count,
    mini_gemini_token_count,
    normalize_compression,
    video_token_count,
)
from .voco import VOCO_CHAT_TEMPLATE, voco_group_text, voco_video_text

logger = logging.get_logger(__name__)

# Where a processor keeps CDPruner's CLIP tokenizer, clear of the LLM tokenizer's files (specs/cdpruner.md §10).
RELEVANCE_TOKENIZER_FOLDER = "relevance_tokenizer"


def last_user_turn(conversation: list[dict]) -> str:
    """The text items of a chat conversation's last user turn, joined with "\n" (specs/cdpruner.md §9)."""
    for message in reversed(conversation):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(item["text"] for item in content or [] if item.get("type") == "text" and "text" in item)
    return ""


def pad_id_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ([n, T] ids right-padded with 0, [n, T] mask); T >= 1."""
    length = max([len(row) for row in rows] + [1])
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids, mask


class SlimProcessorMixin:
    """`compression` handling shared by every Slim processor.

    `compression` is a named init argument, so it is saved in processor_config.json and restored on load:
        processor = SlimLlavaProcessor.from_pretrained(path, compression=model.config.compression)
    """

    # Whether the family takes videos (per-frame VisionZip counts are then part of the compression schema).
    takes_videos = False
    # DivPrune's default scope for the family (as its config's).
    pruner_default_scope = "view"
    # CDPruner's CLIP tokenizer (relevance "clip"); saved in `relevance_tokenizer/`, loaded from there.
    relevance_tokenizer = None
    _chat_instructions = None
    _warned_prompt_instruction = False

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        compression: dict | None = None,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        self.set_compression(compression)

    def set_compression(self, compression: dict | None):
        """Switch compression (must match the model's); returns self."""
        self.compression = normalize_compression(compression, self._tokens_per_view(), video=self.takes_videos,
                                                 default_scope=self.pruner_default_scope,
                                                 relevance_encoder=True if self.relevance_tokenizer is not None else None)
        return self

    # ---- CDPruner's instruction (specs/cdpruner.md §9) ----------------------------------------------------

    def __call__(self, *args, instructions: list[str] | str | None = None, **kwargs):
        """The stock processor call; under CDPruner also `relevance_input_ids` / `relevance_attention_mask`: the
        instruction of each image's sample, one row per image (videos: `relevance_video_*`, one row per video).

        The instruction is `instructions` (one string per sample), else the chat messages' last user turn (via
        `apply_chat_template`), else the prompt with its image/video placeholders removed (with a one-time
        warning: that includes the template, so it is not the papers' setting).
        """
        outputs = super().__call__(*args, **kwargs)
        if self.compression["method"] != "cdpruner":
            return outputs
        bound = inspect.signature(super().__call__).bind_partial(*args, **kwargs).arguments
        text = bound.get("text")
        texts = [text] if isinstance(text, str) else list(text or [])
        if instructions is None:
            instructions = self._chat_instructions
        if isinstance(instructions, str):
            instructions = [instructions]
        if instructions is None:
            placeholders = [token for token in (self.image_token, getattr(self, "video_token", None)) if token]
            instructions = []
            for sample in texts:
                for token in placeholders:
                    sample = sample.replace(token, "")
                instructions.append(sample.strip())
            if not SlimProcessorMixin._warned_prompt_instruction and texts:
                SlimProcessorMixin._warned_prompt_instruction = True
                logger.warning("CDPruner: no `instructions=` and no chat messages, so the prompt without its placeholders "
                               "(template text included) conditions the selection; pass instructions=[question, ...] "
                               "for the papers' setting")
        if len(instructions) != len(texts):
            raise ValueError(f"instructions has {len(instructions)} entries for {len(texts)} text samples; give one per sample")
        for modality, token in (("", self.image_token), ("video_", getattr(self, "video_token", None))):
            if token is None:
                continue
            rows = [instruction for sample, instruction in zip(texts, instructions) for _ in range(sample.count(token))]
            if modality == "video_" and not rows:
                continue
            ids, mask = self.relevance_inputs(rows)
            outputs[f"relevance_{modality}input_ids"] = ids
            outputs[f"relevance_{modality}attention_mask"] = mask
        return outputs

    def relevance_inputs(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask of `instructions` (one per image) for the model's relevance: [n, R, 77] CLIP rows under
        relevance "clip" (BOS + tokens + EOS, split every 77, §2.3), [n, T] LLM-vocabulary ids otherwise."""
        if self.compression["relevance"] == "llm_embeddings":
            return pad_id_rows([self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in instructions])
        tokenizer = self.relevance_tokenizer
        if tokenizer is None:
            raise ValueError("compression['relevance'] = 'clip' needs the CLIP tokenizer (relevance_tokenizer/) with the "
                             "processor; save the processor of a checkpoint converted with a relevance encoder")
        encoded = [clip_text_rows(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.bos_token_id,
                                  tokenizer.eos_token_id) for text in instructions]
        rows = max([ids.shape[0] for ids, _ in encoded] + [1])
        ids = torch.zeros(len(encoded), rows, encoded[0][0].shape[1] if encoded else 77, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, (row_ids, row_mask) in enumerate(encoded):
            ids[index, : row_ids.shape[0]], mask[index, : row_ids.shape[0]] = row_ids, row_mask
        return ids, mask

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The stock save, plus CDPruner's CLIP tokenizer in `relevance_tokenizer/` when the processor has one."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        if self.relevance_tokenizer is not None:
            self.relevance_tokenizer.save_pretrained(os.path.join(save_directory, RELEVANCE_TOKENIZER_FOLDER))
        return saved

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, compression: dict | None = None, **kwargs):
        """The stock load; a local folder's `relevance_tokenizer/` becomes `relevance_tokenizer` (before `compression`
        is validated, so relevance "clip" is allowed)."""
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), RELEVANCE_TOKENIZER_FOLDER)
        if os.path.isdir(folder):
            from transformers import AutoTokenizer

            processor.relevance_tokenizer = AutoTokenizer.from_pretrained(folder)
        if compression is not None or processor.relevance_tokenizer is not None:
            processor.set_compression(compression if compression is not None else processor.compression)
        return processor

    def _tokens_per_view(self) -> int | None:
        """CLS + patches of one processed view, to bound VisionZip's dominant + contextual as the model does."""
        crop_size = getattr(getattr(self, "image_processor", None), "crop_size", None)
        if not crop_size or not self.patch_size or not crop_size.get("height") or not crop_size.get("width"):
            return None
        return (crop_size["height"] // self.patch_size) * (crop_size["width"] // self.patch_size) + 1

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Under VoCo, default to the VoCo template (image first, then "\\n", system and turns; specs/voco.md §2):
        llava-hf's template puts "USER: " before the image, which the cached VoCo path cannot reproduce."""
        if chat_template is None and self.compression["method"] == "voco":
            chat_template = VOCO_CHAT_TEMPLATE
        if self.compression["method"] != "cdpruner":
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        batched = conversation and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        self._chat_instructions = [last_user_turn(list(messages)) for messages in conversations]
        try:  # with tokenize=True the stock method calls the processor, which reads the instructions
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        finally:
            self._chat_instructions = None

    def _with_voco_group(self, placeholders: str) -> str:
        """VoCo layout (specs/voco.md §2): image, "\\n", K <voco>; write prompts with build_voco_prompt
        ("<image>\\n" first) so the group is followed by the second "\\n" and the text."""
        if self.compression["method"] == "voco":
            placeholders += voco_group_text(self.compression["num_voco_tokens"])
        return placeholders


class SingleViewImageMixin:
    """Image placeholders of one-view families (LLaVA-1.5, Video-LLaVA's images): the stock count, then the
    compression's."""

    def _tokens_per_image(self, height: int, width: int) -> int:
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            count -= 1
        return image_token_count(self.compression, count)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        pixel_values = image_inputs.get("pixel_values", image_inputs.get("pixel_values_images"))
        height, width = get_image_size(to_numpy_array(pixel_values[image_idx]))
        return self._with_voco_group(self.image_token * self._tokens_per_image(height, width))


class SlimLlavaProcessor(SingleViewImageMixin, SlimProcessorMixin, LlavaProcessor):
    """`LlavaProcessor` whose placeholder count follows `compression` (the model's `config.compression`)."""

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(**kwargs)["images_kwargs"]
        crop_size = images_kwargs.get("crop_size", None) or self.image_processor.crop_size
        count = self._tokens_per_image(crop_size["height"], crop_size["width"])
        return MultiModalData(num_image_tokens=[count] * len(image_sizes), num_image_patches=[1] * len(image_sizes))


class SlimLlavaNextProcessor(SlimProcessorMixin, LlavaNextProcessor):
    """`LlavaNextProcessor` whose placeholder count follows `compression`.

    Under VisionZip an image becomes (1 + gh·gw)·K tokens: the base view and each of the gh x gw anyres crops
    compressed to K = d + c, in the official layout without unpadding or newlines (specs/visionzip.md §7.2).
    CDPruner / DivPrune: (1 + gh·gw)·K with scope "view" (the official layout), K (or round(ratio·V)) of the
    stock V with scope "image". Other methods keep the stock count (base + unpadded crops + one newline per row).
    """

    pruner_default_scope = "image"

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        method = self.compression["method"]
        if method not in ("visionzip", "cdpruner", "divprune"):
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        best_height, best_width = select_best_resolution([orig_height, orig_width], self.image_processor.image_grid_pinpoints)
        stock = None
        if method != "visionzip" and self.compression["scope"] == "image":
            stock = super()._get_number_of_features(orig_height, orig_width, height, width)
            stock -= 1 if self.vision_feature_select_strategy == "default" else 0
        patches = (height // self.patch_size) * (width // self.patch_size)
        count = anyres_visionzip_token_count(self.compression, (best_height // height, best_width // width), patches, stock)
        # Both stock callers (replace_image_token, _get_num_multimodal_tokens) subtract the CLS of the base view
        # under the "default" strategy; the count here is final, so that CLS is counted back.
        return count + (1 if self.vision_feature_select_strategy == "default" else 0)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self._with_voco_group(super().replace_image_token(image_inputs, image_idx, **kwargs))


def mini_gemini_views(pixel_values_aux: torch.Tensor, base_image_size: int, image_grid: int, image_global: bool) -> torch.Tensor:
    """Mini-Gemini's CLIP views from the normalised high-resolution tensor (specs/mini_gemini.md §2.3-2.4).

    pixel_values_aux: [B, 3, S_aux, S_aux]. The low-resolution image is a float32 bilinear resize
    (align_corners=False, no antialias) to base·grid; with a grid it is cut into grid x grid crops (row-major),
    and the global view is a second resize of that image to base (1536 -> 672 -> 336 for HD).
    Returns [B, 3, base, base] (one view) or [B, views, 3, base, base] ordered [c00, c01, ..., global].
    """
    side = base_image_size * image_grid
    low = F.interpolate(pixel_values_aux.float(), size=(side, side), mode="bilinear", align_corners=False)
    if image_grid == 1 and not image_global:
        return low
    batch, channels = low.shape[:2]
    crops = low.reshape(batch, channels, image_grid, base_image_size, image_grid, base_image_size)
    views = [crops.permute(0, 2, 4, 1, 3, 5).reshape(batch, image_grid**2, channels, base_image_size, base_image_size)]
    if image_global:
        views.append(F.interpolate(low, size=(base_image_size, base_image_size), mode="bilinear", align_corners=False)[:, None])
    return torch.cat(views, dim=1)


class SlimMiniGeminiProcessor(SlimProcessorMixin, LlavaProcessor):
    """Mini-Gemini's processor: `pixel_values_aux` (pad to square with the mean colour, CLIP preprocessing at
    `image_size_aux`) and `pixel_values` derived from it (`mini_gemini_views`), and views x K placeholders per
    image (K = `num_image_tokens`, or d + c under VisionZip).

    The image processor should be `LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": S_aux},
    crop_size={"height": S_aux, "width": S_aux})` with the OpenAI CLIP mean and std: the original used PIL resizing.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token="<image>",
        image_size_aux: int = 768,
        image_grid: int = 1,
        image_global: bool = False,
        base_image_size: int = 336,
        num_image_tokens: int = 576,
        compression: dict | None = None,
        **kwargs,
    ):
        self.image_size_aux = image_size_aux
        self.image_grid = image_grid
        self.image_global = image_global
        self.base_image_size = base_image_size
        self.num_image_tokens = num_image_tokens
        kwargs.pop("patch_size", None)
        kwargs.pop("vision_feature_select_strategy", None)
        kwargs.pop("num_additional_image_tokens", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                         image_token=image_token, vision_feature_select_strategy="default", compression=compression,
                         **kwargs)

    @property
    def views_per_image(self) -> int:
        return self.image_grid**2 + int(self.image_global)

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "pixel_values_aux"]

    def _tokens_per_view(self) -> int | None:
        return self.num_image_tokens + 1  # CLS + patches of one CLIP view

    def tokens_per_image(self) -> int:
        """Placeholders one image gets: views x (num_image_tokens, or d + c under VisionZip)."""
        return mini_gemini_token_count(self.compression, self.num_image_tokens, self.views_per_image)

    def _process_images(self, images, **kwargs):
        processed = self.image_processor(images, **{**kwargs, "return_tensors": "pt"})
        pixel_values_aux = processed["pixel_values"]
        pixel_values = mini_gemini_views(pixel_values_aux, self.base_image_size, self.image_grid, self.image_global)
        text = self._with_voco_group(self.image_token * self.tokens_per_image())
        replacements = [text] * len(make_flat_list_of_images(images))
        return BatchFeature({"pixel_values": pixel_values, "pixel_values_aux": pixel_values_aux}), replacements

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.tokens_per_image()] * len(image_sizes),
                              num_image_patches=[self.views_per_image] * len(image_sizes))


class FrameVideoProcessor:
    """Video frames through an image processor's PIL/numpy path, one frame at a time: no torchvision needed.

    Video-LLaVA preprocesses every frame as a CLIP image (RGB, resize shortest edge to 224 bicubic, center crop
    224, rescale 1/255, normalise with the OpenAI CLIP mean/std), which is exactly what its image processor does.
    Accepts one video or a batch: a list of PIL frames, an array / tensor [frames, H, W, 3], or a list of those.
    Returns `pixel_values_videos` [videos, frames, 3, H, W].
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        processed = []
        for video in make_batched_videos(videos):
            frames = [frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame) for frame in video]
            out = self.image_processor(frames, return_tensors="np")
            processed.append(np.asarray(out.get("pixel_values", out.get("pixel_values_images"))))
        if len({video.shape for video in processed}) > 1:
            raise ValueError(f"videos in one batch need the same number of frames; got {[v.shape[0] for v in processed]}")
        return BatchFeature({"pixel_values_videos": np.stack(processed)}, tensor_type=return_tensors)


class FrameVideoLlavaProcessor(VideoLlavaProcessor):
    """`VideoLlavaProcessor` without its `video_processor` sub-processor (transformers' video processors need
    torchvision): frames go through the image processor instead (`FrameVideoProcessor`)."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size=14, vision_feature_select_strategy="default",
                 image_token="<image>", video_token="<video>", chat_template=None, num_additional_image_tokens=1,
                 **kwargs):
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def video_processor(self) -> FrameVideoProcessor:
        """The frames' preprocessing: the image processor, frame by frame."""
        return FrameVideoProcessor(self.image_processor)

    def _process_images(self, images, **kwargs):
        if "return_legacy_image_output" in inspect.signature(self.image_processor.preprocess).parameters:
            kwargs["return_legacy_image_output"] = False
        processed, replacements = super()._process_images(images, **kwargs)
        if "pixel_values_images" in processed:  # VideoLlavaImageProcessor's legacy key; the models take pixel_values
            processed["pixel_values"] = processed.pop("pixel_values_images")
        return processed, replacements

class SlimVideoLlavaProcessor(SingleViewImageMixin, SlimProcessorMixin, FrameVideoLlavaProcessor):
    """Video-LLaVA's processor whose placeholder counts follow `compression`, with torchvision-free video frames.

    Images: K = dominant + contextual placeholders under VisionZip (the stock 256 otherwise). Videos: F x K with
    K = video_dominant + video_contextual under VisionZip (the stock F x 257 otherwise); under VoCo every frame
    is followed by its own group of `<voco>` tokens (specs/voco.md §7).
    """

    takes_videos = True

    def __init__(self, image_processor=None, tokenizer=None, patch_size=14, vision_feature_select_strategy="default",
                 chat_template=None, image_token="<image>", num_additional_image_tokens=1,
                 compression: dict | None = None, video_token="<video>", **kwargs):
        # The stock VideoLlavaProcessor's defaults (CLS counted, "default" strategy for images).
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, num_additional_image_tokens=num_additional_image_tokens,
                         compression=compression, video_token=video_token, **kwargs)

    def _tokens_per_frame(self, height: int, width: int) -> int:
        """Stock tokens of one frame: the video tower keeps CLS (257 for 224-px frames)."""
        return (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        frames, height, width = video.shape[0], video.shape[-2], video.shape[-1]
        count = video_token_count(self.compression, self._tokens_per_frame(height, width), frames)
        if self.compression["method"] == "voco":
            return voco_video_text(self.video_token * (count // frames), frames, self.compression["num_voco_tokens"])
        return self.video_token * count


SlimLlavaProcessor.register_for_auto_class("AutoProcessor")
SlimLlavaNextProcessor.register_for_auto_class("AutoProcessor")
SlimMiniGeminiProcessor.register_for_auto_class("AutoProcessor")
SlimVideoLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["FrameVideoLlavaProcessor", "FrameVideoProcessor", "SlimLlavaNextProcessor", "SlimLlavaProcessor",
           "SlimMiniGeminiProcessor", "SlimVideoLlavaProcessor", "mini_gemini_views"]
