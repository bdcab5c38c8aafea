"""Tiny, offline Qwen-VL models, tokenizer and processors for tests (specs/modern_families.md §7)."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_ID, VIDEO_ID, START_ID, END_ID = 290, 291, 292, 293
PAD_ID = 0
VOCAB = 300


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer, vocab 300: <pad> <s> </s> <unk>, words w4..w289, then the vision tokens at 290-293."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, IMAGE_ID)})
    vocab.update({"<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID, "<|vision_start|>": START_ID,
                  "<|vision_end|>": END_ID, "<voco>": 294})
    vocab.update({f"x{i}": i for i in range(295, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("<|image_pad|>", behavior="isolated"), pre_tokenizers.Split("<|video_pad|>", behavior="isolated"),
        pre_tokenizers.WhitespaceSplit()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                                "<|vision_end|>", "<voco>"]})
    return tokenizer


def qwen2_5_config(fullatt=(1, 3), **kwargs) -> Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL (§7): vision depth 4, hidden 64, 4 heads, window 56 (2 x 2-unit windows); fullatt (1, 3)
    scores with a full block, (1,) with a windowed one. Text 2 layers, hidden 64, mrope [4, 2, 2]."""
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=128, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=list(fullatt), out_hidden_size=64, tokens_per_second=2),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID,
        **kwargs)


def qwen_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14):
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def prompt(image_token: str = "<|image_pad|>", before: str = "w10 w11 w12", after: str = "w20 w21 w22") -> str:
    return f"{before} <|vision_start|>{image_token}<|vision_end|> {after}"


def sharpen(model, scale: float = 4.0):
    """Scale the LM's weights so greedy tokens are decisive (no near-ties between cache and cache-free runs)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                parameter.mul_(scale) if parameter.ndim == 2 else None
    return model


def qwen3_config(**kwargs):
    """Tiny Qwen3-VL (§7): the Qwen2.5 tiny vision sizes with patch 16, a 4 x 4 learned position table, DeepStack
    after blocks 0 and 2; 3 text layers, head_dim 16, interleaved mrope [4, 2, 2]."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        vision_config=dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=128, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 2]),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID,
        **kwargs)
