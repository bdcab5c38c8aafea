"""Tiny, offline building blocks for tests: a word-level tokenizer, tiny LLaVA configs and checkpoints.

Nothing here touches the network; every model is random and built from a config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<voco>"]
WORDS = (
    "USER ASSISTANT : ? . , what is the color shape of a an in on at left right top bottom how many are there "
    "red green blue yellow circle square triangle one two three four yes no describe image picture this"
).split()


def make_tokenizer(voco: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0-5 are <pad> <s> </s> <unk> <image> <voco>, then WORDS and '\\n'.

    voco=False: id 5 is a plain `<unused>` word instead, as in a base checkpoint before `add_voco_token`."""
    specials = SPECIAL_TOKENS if voco else [token if token != "<voco>" else "<unused>" for token in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate(specials + WORDS + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<voco>"] if voco else ["<image>"]})
    return tokenizer


def pad_rows(rows: list[list[int]], padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of unequal length -> (ids [B, L] padded with 0, real [B, L] 1 at tokens), left or right."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    real = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[b, span], real[b, span] = torch.tensor(row), 1
    return ids, real


IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")
PAD_TOKEN_ID = SPECIAL_TOKENS.index("<pad>")


def tiny_llava_config(
    vision_layers: int = 4,
    image_size: int = 48,
    patch_size: int = 2,
    vision_hidden: int = 32,
    text_layers: int = 2,
    text_hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int | None = None,
    **llava_kwargs,
) -> LlavaConfig:
    """A tiny LLaVA-1.5-shaped config: (image_size / patch_size)^2 patches (24x24 = 576 by default)."""
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
    )
    text = LlamaConfig(
        vocab_size=vocab_size or len(SPECIAL_TOKENS) + len(WORDS) + 1,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        **llava_kwargs,
    )


def tiny_stock_model(seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).eval()


def make_processor(image_size: int = 48, patch_size: int = 2, voco: bool = True) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_tokenizer(voco),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def save_stock_checkpoint(folder: Path, seed: int = 0, voco: bool = True, **config_kwargs) -> Path:
    """Write a stock llava-hf style checkpoint (model + processor) to `folder` (voco: see make_tokenizer)."""
    model = tiny_stock_model(seed, **config_kwargs)
    model.save_pretrained(folder)
    make_processor(model.config.vision_config.image_size, model.config.vision_config.patch_size, voco).save_pretrained(folder)
    return Path(folder)


def random_images(count: int, size: int = 48, seed: int = 0):
    """PIL images of random colour noise."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    arrays = (torch.rand(count, size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(array) for array in arrays]


# ---- LLaVA-NeXT: 48-px views (24x24 patches), anyres grids of 1x2, 2x1, 2x2, 1x3 and 3x1 views

NEXT_PINPOINTS = [[48, 96], [96, 48], [96, 96], [48, 144], [144, 48]]
# Original image sizes (height, width) whose best-fit resolution gives each grid (gh, gw).
NEXT_IMAGE_SIZES = {(2, 2): (90, 90), (1, 2): (45, 90), (3, 1): (150, 45)}


def tiny_llava_next_config(**tiny_kwargs):
    """The tiny LLaVA-1.5 towers (`tiny_llava_config` arguments) in a LLaVA-NeXT config with NEXT_PINPOINTS."""
    from transformers import LlavaNextConfig

    base = tiny_llava_config(**tiny_kwargs).to_dict()
    return LlavaNextConfig(vision_config=base["vision_config"], text_config=base["text_config"],
                           image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=NEXT_PINPOINTS)


def make_next_processor():
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, image_grid_pinpoints=NEXT_PINPOINTS,
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=2,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def next_images(grids, seed: int = 0, sizes=None):
    """PIL images of random noise whose anyres grids are `grids` (keys of `sizes`, default NEXT_IMAGE_SIZES)."""
    from PIL import Image

    sizes = NEXT_IMAGE_SIZES if sizes is None else sizes
    generator = torch.Generator().manual_seed(seed)
    images = []
    for grid in grids:
        height, width = sizes[grid]
        array = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(array))
    return images


# ---- Mini-Gemini: 48-px CLIP views (24x24 patches) and a tiny ConvNeXt whose stage 0 gives 2x2-pixel cells per patch

MGM_CONVNEXT = dict(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 2, 1], patch_size=4, hidden_act="gelu",
                    layer_scale_init_value=1e-6, drop_path_rate=0.0, num_channels=3)
MGM_SIZE_AUX = {False: 192, True: 384}  # MGM: one 48-px view; HD: 2x2 crops of 48 + a global view


def tiny_mini_gemini_config(hd: bool = False, **tiny_kwargs) -> dict:
    """Keyword arguments of a tiny SlimMiniGeminiConfig (the tiny LLaVA towers, `tiny_llava_config` arguments)."""
    from transformers import ConvNextConfig

    base = tiny_llava_config(**tiny_kwargs).to_dict()
    return dict(vision_config=base["vision_config"], text_config=base["text_config"], image_token_index=IMAGE_TOKEN_ID,
                vision_config_aux=ConvNextConfig(**MGM_CONVNEXT).to_dict(), image_size_aux=MGM_SIZE_AUX[hd],
                image_grid=2 if hd else 1, image_global=hd, image_seq_length=(5 if hd else 1) * 576)


def make_mgm_image_processor(size_aux: int):
    """MGM's preprocessing (PIL backend): pad to square with the mean colour, CLIP resize/crop at the aux size."""
    from slimvlm.conversion.mini_gemini_original import mgm_image_processor

    return mgm_image_processor(size_aux)


def make_mgm_processor(hd: bool = False, compression=None, padding_side: str = "left"):
    from slimvlm import SlimMiniGeminiProcessor

    processor = SlimMiniGeminiProcessor(image_processor=make_mgm_image_processor(MGM_SIZE_AUX[hd]), tokenizer=make_tokenizer(),
                                        image_size_aux=MGM_SIZE_AUX[hd], image_grid=2 if hd else 1, image_global=hd,
                                        base_image_size=48, num_image_tokens=576, compression=compression)
    processor.tokenizer.padding_side = padding_side
    return processor


# ---- Video-LLaVA: two tiny towers (24-px views, patch 4 -> 36 patches + CLS = 37 tokens); <video> after the words

VIDEO_SIDE = 24
VIDEO_PATCH = 4


def make_video_tokenizer():
    """`make_tokenizer` plus `<video>` (id 6); the words shift by one."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<voco>", "<video>"]})
    assert tokenizer.convert_tokens_to_ids("<video>") == len(SPECIAL_TOKENS) + len(WORDS) + 1
    return tokenizer


def tiny_video_llava_config(**tiny_kwargs):
    """The tiny LLaVA towers and LM (`tiny_llava_config` arguments) in a VideoLlavaConfig."""
    from transformers import VideoLlavaConfig

    tiny_kwargs = {"image_size": VIDEO_SIDE, "patch_size": VIDEO_PATCH, **tiny_kwargs}
    base = tiny_llava_config(vocab_size=len(SPECIAL_TOKENS) + len(WORDS) + 2, **tiny_kwargs).to_dict()
    return VideoLlavaConfig(vision_config=base["vision_config"], text_config=base["text_config"],
                            image_token_index=IMAGE_TOKEN_ID, video_token_index=video_token_id())


def video_token_id() -> int:
    return len(SPECIAL_TOKENS) + len(WORDS) + 1


def make_video_image_processor(side: int = VIDEO_SIDE):
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    return VideoLlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def random_video(frames: int, height: int = 30, width: int = 40, seed: int = 0):
    """A [frames, H, W, 3] uint8 array of random noise (not square, so resize + crop both act)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(frames, height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()


def load_quantized(model_class, folder, bits: int, **kwargs):
    """`model_class.from_pretrained(folder)` in bitsandbytes 4- or 8-bit on the CPU, in eval mode."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    return model_class.from_pretrained(folder, quantization_config=quantization, device_map="cpu", **kwargs).eval()


def sharpen_language_model(model, scale: float = 4.0):
    """Scale the decoder's weight matrices by `scale` and lm_head by 10·scale (in place; returns the model), so
    that masking and position errors (VoCo) show in the logits instead of vanishing in a near-uniform softmax."""
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if "layers" in name and "weight" in name and param.dim() == 2:
                param.mul_(scale)
        model.lm_head.weight.mul_(10 * scale)
    return model


# ---- LLaVA-OneVision (specs/modern_families.md §7): SigLIP 56-px views, patch 14 (4x4 = 16 patches, no CLS), Qwen2

OV_SIDE = 56
OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
# Original image sizes (height, width) whose best-fit resolution gives each grid (gh, gw).
OV_IMAGE_SIZES = {(1, 1): (56, 56), (1, 2): (56, 84), (1, 3): (100, 300), (2, 2): (112, 112)}


def tiny_onevision_config(text_hidden: int = 32, vision_hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                          **kwargs):
    """A tiny LlavaOnevisionConfig: SigLIP (3 layers, 4 heads, 56 px, patch 14), Qwen2 (2 layers) on make_video_tokenizer's ids."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=3,
                                num_attention_heads=4, image_size=OV_SIDE, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(SPECIAL_TOKENS) + len(WORDS) + 2, hidden_size=text_hidden,
                       intermediate_size=2 * text_hidden, num_hidden_layers=2, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=4096, pad_token_id=0)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                                video_token_index=video_token_id(), image_grid_pinpoints=OV_PINPOINTS, **kwargs)


def make_onevision_image_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": OV_SIDE, "width": OV_SIDE}, image_grid_pinpoints=OV_PINPOINTS,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)


def onevision_images(grids, seed: int = 0):
    """PIL images of random noise whose anyres grids are `grids` (keys of OV_IMAGE_SIZES)."""
    return next_images(grids, seed, OV_IMAGE_SIZES)
