"""Checkpoints of the original LLaVA training code -> stock transformers LLaVA checkpoints.

The original code (haotian-liu/LLaVA) saves `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`: a language-model
config with `mm_*` fields, and weights

    model.embed_tokens / model.layers.* / model.norm / lm_head        the language model
    model.mm_projector.0.* / model.mm_projector.2.*                   the 2-layer MLP projector (mlp2x_gelu)
    model.vision_tower.vision_tower.vision_model.*                    the CLIP tower, only when it was trained;
                                                                      else the tower named by mm_vision_tower
    model.image_newline                                               LLaVA-1.6 (anyres) only

LLaVA-1.5 configs become a stock `LlavaForConditionalGeneration` checkpoint (which `convert_to_slim` turns into a
slim one); LLaVA-1.6 configs (`image_aspect_ratio: anyres`) a stock `LlavaNextForConditionalGeneration` with
`image_grid_pinpoints` and a `LlavaNextProcessor`. Every weight of the target model must come from the checkpoint
or the tower, and every checkpoint weight must have a place (an unmapped key raises). `.bin` files are read only
with `torch.load(weights_only=True)`. The output appears whole or not at all.

The original code puts `<image>` into input ids as -200; transformers needs a token, so `<image>` is added to the
tokenizer when it has none, and its embedding and lm_head rows are the mean of the existing rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from .atomic import atomic_folder, refuse_existing
from .voco_official import OFFICIAL_KEY_MAP, TEXT_FIELDS, map_official_key

ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# the original key names -> transformers' (LLaVA-1.5 and -NeXT share them; image_newline exists only in NeXT)
ORIGINAL_KEY_MAP: tuple[tuple[str, str | None], ...] = (
    (r"^model\.image_newline$", "model.image_newline"),
    *(entry for entry in OFFICIAL_KEY_MAP if entry[0] != r"^model\.image_newline$"),
)
TOWER_PREFIX = "model.vision_tower."
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"


def is_original_llava_config(config: dict) -> bool:
    """Whether a config.json dict is the original LLaVA code's (an LM config with mm_* fields, no vision_config)."""
    architectures = config.get("architectures") or []
    return "vision_config" not in config and (
        any(name in ARCHITECTURES for name in architectures)
        or ("mm_vision_tower" in config and config.get("model_type") in MODEL_TYPES)
    )


def is_original_llava_folder(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and is_original_llava_config(json.loads(path.read_text()))


def is_anyres(config: dict) -> bool:
    return "anyres" in str(config.get("image_aspect_ratio") or "")


def _checked(config: dict, field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"original LLaVA config {field} = {value!r} is not supported; allowed: {sorted(allowed, key=str)}")


def text_config_from_original(config: dict):
    """The language model's config (Llama or Mistral) from the original config's LM fields."""
    from transformers import LlamaConfig, MistralConfig

    architectures = [name for name in config.get("architectures") or [] if name in ARCHITECTURES]
    family = ARCHITECTURES[architectures[0]] if architectures else MODEL_TYPES[config["model_type"]]
    fields = {key: config[key] for key in (*TEXT_FIELDS, "vocab_size", "sliding_window", "attention_bias",
                                           "head_dim", "pad_token_id") if config.get(key) is not None}
    text_class = MistralConfig if family == "mistral" else LlamaConfig
    return text_class(tie_word_embeddings=False, **fields)


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint folder: *.safetensors, else pytorch_model*.bin through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        loaded = [load_file(str(file)) for file in files]
    else:
        files = sorted(folder.glob("pytorch_model*.bin"))
        loaded = [torch.load(file, map_location="cpu", weights_only=True) for file in files]
    if not files:
        raise FileNotFoundError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for part in loaded:
        state.update(part)
    return state


def tower_state_dict(vision_tower: str | os.PathLike):
    """The CLIP vision tower's weights under transformers' names (`model.vision_tower.*`) and its config."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(vision_tower)
    return {TOWER_PREFIX + key: value for key, value in tower.state_dict().items()}, tower.config


def convert_original_llava(
    source: str | os.PathLike,
    output: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a stock transformers checkpoint (model, config, processor) converted from an original LLaVA folder.

    vision_tower: the CLIP tower (Hub id or folder) for the vision config, for the weights when the checkpoint
        has no tower keys, and for the image processor when the folder has no preprocessor_config.json
        (default: the config's mm_vision_tower).
    Returns `output`. Raises ValueError for configs the stock classes cannot express (projector type, feature
    selection, image start/end tokens, patch merge type), an unmapped key, a missing or misshapen weight.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor)

    step = progress or (lambda description: None)
    source, output = Path(source), Path(output)
    refuse_existing(output, overwrite)
    config = json.loads((source / "config.json").read_text())
    if not is_original_llava_config(config):
        raise ValueError(f"{source}/config.json is not an original LLaVA config (architectures "
                         f"{config.get('architectures')}, allowed: {sorted(ARCHITECTURES)})")
    _checked(config, "mm_projector_type", config.get("mm_projector_type", "mlp2x_gelu"), {"mlp2x_gelu"})
    _checked(config, "mm_vision_select_feature", config.get("mm_vision_select_feature", "patch"), set(SELECT_FEATURES))
    _checked(config, "mm_use_im_start_end", bool(config.get("mm_use_im_start_end", False)), {False})
    anyres = is_anyres(config)
    if anyres:
        _checked(config, "mm_patch_merge_type", config.get("mm_patch_merge_type", "spatial_unpad"), {"spatial_unpad"})
        if not config.get("image_grid_pinpoints"):
            raise ValueError("original LLaVA config image_aspect_ratio = 'anyres' needs image_grid_pinpoints, got none")
    tower_source = str(vision_tower or config.get("mm_vision_tower") or DEFAULT_VISION_TOWER)

    step(f"reading the weights of {source}")
    original = read_state_dict(source)
    state = {}
    for key, tensor in original.items():
        new_key = map_official_key(key, ORIGINAL_KEY_MAP, layout="original LLaVA")
        if new_key is not None:
            state[new_key] = tensor
    if "model.image_newline" in state and not anyres:
        raise ValueError("original LLaVA weight 'model.image_newline' exists only for image_aspect_ratio 'anyres' "
                         f"(LLaVA-1.6), but the config has {config.get('image_aspect_ratio')!r}")
    if any(key.startswith(TOWER_PREFIX) for key in state):
        vision_config = CLIPVisionConfig.from_pretrained(tower_source)
    else:
        step(f"loading the vision tower {tower_source}")
        tower_weights, vision_config = tower_state_dict(tower_source)
        state.update(tower_weights)

    step("checking the weights against the stock model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    text_config = text_config_from_original(config)
    vocab_size = state["model.language_model.embed_tokens.weight"].shape[0]
    if image_token_index >= vocab_size:
        # <image> is new: one more row (mean of the others) in the embeddings and lm_head
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            rows = state[key]
            mean = rows.float().mean(0, keepdim=True).to(rows.dtype).expand(image_token_index + 1 - rows.shape[0], -1)
            state[key] = torch.cat([rows, mean])
        vocab_size = image_token_index + 1
    text_config.vocab_size = vocab_size
    common = dict(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                  image_token_index=image_token_index, projector_hidden_act="gelu", tie_word_embeddings=False,
                  vision_feature_layer=config.get("mm_vision_select_layer", -2),
                  vision_feature_select_strategy=SELECT_FEATURES[config.get("mm_vision_select_feature", "patch")],
                  image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2)
    if anyres:
        stock_config = LlavaNextConfig(image_grid_pinpoints=config["image_grid_pinpoints"], **common)
        model_class = LlavaNextForConditionalGeneration
    else:
        stock_config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
    dtype = next(iter(state.values())).dtype
    stock_config.dtype = dtype
    check_state_dict(model_class, stock_config, state)

    step("building the processor")
    if (source / "preprocessor_config.json").is_file():
        clip = CLIPImageProcessor.from_pretrained(source)
    else:
        try:
            clip = CLIPImageProcessor.from_pretrained(tower_source)
        except OSError:  # a tower without a processor config: CLIP's preprocessing at the tower's resolution
            size = vision_config.image_size
            clip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor_args = dict(tokenizer=tokenizer, patch_size=vision_config.patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy=common["vision_feature_select_strategy"])
    if anyres:
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=config["image_grid_pinpoints"], size=clip.size,
                                                  crop_size=clip.crop_size, image_mean=clip.image_mean,
                                                  image_std=clip.image_std, resample=clip.resample)
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_args)
    else:
        processor = LlavaProcessor(image_processor=clip, **processor_args)

    step(f"writing {output}")
    with atomic_folder(output) as staging:
        stock_config.architectures = [model_class.__name__]
        stock_config.save_pretrained(staging)
        save_torch_state_dict({key: tensor.contiguous() for key, tensor in state.items()}, staging)
        processor.save_pretrained(staging)
    return output


def check_state_dict(model_class, config, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `state` has exactly the persistent weights of `model_class(config)`, in their shapes
    (the model is built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in model_class(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(key for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
    if missing or unexpected or misshapen:
        raise ValueError(
            f"the original LLaVA checkpoint does not fit {model_class.__name__}: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, misshapen {[(k, tuple(state[k].shape), expected[k]) for k in misshapen[:8]]}"
        )


__all__ = ["ORIGINAL_KEY_MAP", "check_state_dict", "convert_original_llava", "is_original_llava_config",
           "is_original_llava_folder"]
