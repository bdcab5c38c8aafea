"""Checkpoints of the original Mini-Gemini code (dvlab-research/MGM) -> slim Mini-Gemini checkpoints.

The original saves `MGMLlamaForCausalLM` (model_type "mgm"; also Mistral / Gemma / Mixtral variants): a
language-model config with `mm_*` / `image_*` fields, and weights (specs/mini_gemini.md §11)

    model.embed_tokens / model.layers.* / model.norm / lm_head          the language model
    model.mm_projector.{0,2}.*                                          the projector (mlp2x_gelu)
    model.vlm_uni_{query,aux,val}_projector.{0,1}.*                     patch-info mining (0 = LayerNorm, 1 = Linear)
    model.vision_tower.vision_tower.vision_model.*                      CLIP (when stored)
    model.vision_tower_aux.vision_{stem,stages}.*                       the ConvNeXt trunk, timm names (when stored)

The conversion writes our layout directly (safetensors), loads it strictly into
`SlimMiniGeminiForConditionalGeneration` (an unmapped, missing or misshapen weight raises), adds `<image>` as a real
special token (the original used -200), writes the processor, remote code and a card that records the source.
Towers missing from the checkpoint come from `vision_tower` (CLIP, transformers layout) and `vision_tower_aux`
(an open_clip checkpoint: `visual.trunk.{stem,stages}.*`). `.bin` files are read only with
`torch.load(weights_only=True)`. The output appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .atomic import atomic_folder, refuse_existing
from .llava_original import check_state_dict, read_state_dict
from .voco_official import map_official_key

ARCHITECTURES = {"MGMLlamaForCausalLM": "llama", "MGMMistralForCausalLM": "mistral", "MGMGemmaForCausalLM": "gemma"}
MODEL_TYPES = {"mgm": "llama", "mgm_mistral": "mistral", "mgm_gemma": "gemma"}
UNSUPPORTED = {"MGMMixtralForCausalLM": "mixtral", "mgm_mixtral": "mixtral"}
# The local tower paths of the original configs -> the Hub ids they were downloaded from.
TOWER_HUB_IDS = {
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup": "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup",
}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
AUX = r"^model\.vision_tower_aux\."
STAGE = AUX + r"vision_stages\.(\d)\."
# (original pattern, replacement or None = dropped), first match wins; any other key raises.
KEY_MAP: tuple[tuple[str, str | None], ...] = (
    (r".*\.rotary_emb\.inv_freq$", None),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^lm_head\.", "lm_head."),
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vlm_uni_query_projector\.0\.", "model.patch_mining.query_norm."),
    (r"^model\.vlm_uni_query_projector\.1\.", "model.patch_mining.query_proj."),
    (r"^model\.vlm_uni_aux_projector\.0\.", "model.patch_mining.key_norm."),
    (r"^model\.vlm_uni_aux_projector\.1\.", "model.patch_mining.key_proj."),
    (r"^model\.vlm_uni_val_projector\.0\.", "model.patch_mining.value_norm."),
    (r"^model\.vlm_uni_val_projector\.1\.", "model.patch_mining.value_proj."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$", None),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (AUX + r"vision_stem\.0\.", "model.vision_tower_aux.embeddings.patch_embeddings."),
    (AUX + r"vision_stem\.1\.", "model.vision_tower_aux.embeddings.layernorm."),
    (STAGE + r"downsample\.(\d)\.", r"model.vision_tower_aux.encoder.stages.\1.downsampling_layer.\2."),
    (STAGE + r"blocks\.(\d+)\.conv_dw\.", r"model.vision_tower_aux.encoder.stages.\1.layers.\2.dwconv."),
    (STAGE + r"blocks\.(\d+)\.norm\.", r"model.vision_tower_aux.encoder.stages.\1.layers.\2.layernorm."),
    (STAGE + r"blocks\.(\d+)\.mlp\.fc1\.", r"model.vision_tower_aux.encoder.stages.\1.layers.\2.pwconv1."),
    (STAGE + r"blocks\.(\d+)\.mlp\.fc2\.", r"model.vision_tower_aux.encoder.stages.\1.layers.\2.pwconv2."),
    (STAGE + r"blocks\.(\d+)\.gamma$", r"model.vision_tower_aux.encoder.stages.\1.layers.\2.layer_scale_parameter"),
)
# Original config fields that are not language-model fields (mapped elsewhere or dropped, spec §10).
NON_TEXT_FIELDS = {"architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "torch_dtype", "dtype"}


def original_family(config: dict) -> str | None:
    """'llama' / 'mistral' / 'gemma' for an original MGM config.json dict, None for anything else."""
    if "vision_config" in config or "mm_vision_tower_aux" not in config:
        return None
    for name in config.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
        if name in UNSUPPORTED:
            raise ValueError(f"original Mini-Gemini architecture {name!r} is not supported yet; allowed: {sorted(ARCHITECTURES)}")
    if config.get("model_type") in UNSUPPORTED:
        raise ValueError(f"original Mini-Gemini model_type {config['model_type']!r} is not supported yet; allowed: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES.get(config.get("model_type"))


def is_original_mgm_folder(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return "vision_config" not in config and "mm_vision_tower_aux" in config


def map_key(key: str) -> str | None:
    """Our name of an original Mini-Gemini weight (None: dropped); ValueError for a key without a mapping."""
    return map_official_key(key, KEY_MAP, layout="original Mini-Gemini")


def tower_hub_id(path: str | None, field: str) -> str:
    """A local tower path of the original config (e.g. model_zoo/OpenAI/clip-vit-large-patch14-336) as a Hub id."""
    name = Path(str(path or "")).name
    if name in TOWER_HUB_IDS:
        return TOWER_HUB_IDS[name]
    raise ValueError(f"original Mini-Gemini config {field} = {path!r} names no known tower; known: {sorted(TOWER_HUB_IDS)} "
                     "(pass the tower explicitly)")


def open_clip_trunk(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ConvNeXt trunk (stem, stages) of an open_clip checkpoint under the original MGM names; the rest
    (norm_pre, heads, the text tower, logit_scale) is dropped. `source`: a file, a folder or a Hub id."""
    from safetensors.torch import load_file

    path = Path(source)
    if not path.exists():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(source), "open_clip_pytorch_model.bin"))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{path} has no open_clip checkpoint (*.safetensors or *.bin)")
        path = files[0]
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    trunk = {}
    for key, value in state.items():
        match = re.match(r"^visual\.trunk\.(stem|stages)\.(.*)$", key)
        if match:
            trunk[f"model.vision_tower_aux.vision_{match.group(1)}.{match.group(2)}"] = value
    if not trunk:
        raise ValueError(f"{source} has no visual.trunk.stem / visual.trunk.stages weights (not an open_clip ConvNeXt)")
    return trunk


def convnext_config_from_weights(state: dict[str, torch.Tensor]):
    """The aux tower's `ConvNextConfig` from its (original-named) weights: widths, depths and patch size."""
    from transformers import ConvNextConfig

    from ..configuration_slimvlm import MINI_GEMINI_CONVNEXT

    blocks: dict[int, set[int]] = {}
    widths: dict[int, int] = {}
    for key, value in state.items():
        match = re.match(STAGE + r"blocks\.(\d+)\.conv_dw\.weight$", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks.setdefault(stage, set()).add(block)
            widths[stage] = value.shape[0]
    stem = state["model.vision_tower_aux.vision_stem.0.weight"]
    stages = sorted(blocks)
    return ConvNextConfig(**{**MINI_GEMINI_CONVNEXT, "hidden_sizes": [widths[s] for s in stages],
                             "depths": [len(blocks[s]) for s in stages], "patch_size": stem.shape[-1]})


def text_config_from_original(config: dict, family: str):
    """The language model's config from the original config's top-level LM fields."""
    from transformers import AutoConfig

    text_class = type(AutoConfig.for_model(family))
    names = {field.name for field in dataclasses.fields(text_class)} - NON_TEXT_FIELDS
    return AutoConfig.for_model(family, **{key: value for key, value in config.items() if key in names})


def grow_vocabulary(rows: torch.Tensor, new_size: int, seed: int = 0) -> torch.Tensor:
    """[V, H] -> [new_size, H]: new rows drawn from N(mean, 1e-5·cov) of the existing rows (as llava-hf does), or
    the mean where that covariance is singular (tiny models)."""
    if new_size <= rows.shape[0]:
        return rows
    data = rows.float()
    mean = data.mean(0)
    centred = data - mean
    covariance = centred.T @ centred / data.shape[0]
    factor, info = torch.linalg.cholesky_ex(1e-5 * covariance)
    count = new_size - rows.shape[0]
    if int(info) == 0:
        noise = torch.randn(count, data.shape[1], generator=torch.Generator().manual_seed(seed))
        new = mean + noise @ factor.T
    else:
        new = mean.expand(count, -1)
    return torch.cat([rows, new.to(rows.dtype)])


def snapshot_revision(source: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder (…/snapshots/<sha>), else None."""
    return source.resolve().name if source.resolve().parent.name == "snapshots" else None


def convert_original_mgm(
    source: str | os.PathLike,
    output: str | os.PathLike,
    compression: dict | None = None,
    base_model: str | None = None,
    vision_tower: str | os.PathLike | None = None,
    vision_tower_aux: str | os.PathLike | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a slim Mini-Gemini checkpoint converted from an original MGM folder (e.g. a download of YanweiLi/MGM-7B).

    vision_tower: CLIP (Hub id or folder, transformers layout) for the vision config, and for the weights when the
        checkpoint stores none (default: the config's mm_vision_tower as a Hub id).
    vision_tower_aux: an open_clip ConvNeXt checkpoint (file, folder or Hub id), used only when the checkpoint
        stores no aux tower weights (default: the config's mm_vision_tower_aux as a Hub id).
    base_model / revision: the Hub id and commit the card records as the source (default: the folder name and the
        cache snapshot's commit).
    Raises ValueError for configs the classes cannot express, an unmapped key, or a missing or misshapen weight.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import AddedToken, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

    from ..configuration_slimvlm import SlimMiniGeminiConfig
    from ..hub_cards import card_for_model, write_model_card
    from ..modeling_mini_gemini import SlimMiniGeminiForConditionalGeneration
    from ..processing_slimvlm import SlimMiniGeminiProcessor

    step = progress or (lambda description: None)
    source, output = Path(source), Path(output)
    refuse_existing(output, overwrite)
    config = json.loads((source / "config.json").read_text())
    family = original_family(config)
    if family is None:
        raise ValueError(f"{source}/config.json is not an original Mini-Gemini config (architectures "
                         f"{config.get('architectures')}, allowed: {sorted(ARCHITECTURES)})")
    for field, allowed in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch"),
                           ("image_aspect_ratio", "pad"), ("mm_use_im_start_end", False), ("mm_use_im_patch_token", False)):
        if config.get(field, allowed) != allowed:
            raise ValueError(f"original Mini-Gemini config {field} = {config[field]!r} is not supported; allowed: {allowed!r}")
    clip_source = str(vision_tower or tower_hub_id(config.get("mm_vision_tower"), "mm_vision_tower"))

    step(f"reading the weights of {source}")
    original = read_state_dict(source)
    if not any(key.startswith("model.vision_tower_aux.") for key in original):
        aux_source = vision_tower_aux or tower_hub_id(config.get("mm_vision_tower_aux"), "mm_vision_tower_aux")
        step(f"loading the ConvNeXt trunk of {aux_source}")
        original.update(open_clip_trunk(aux_source))
    state = {}
    for key, tensor in original.items():
        new_key = map_key(key)
        if new_key is not None:
            state[new_key] = tensor
    aux_config = convnext_config_from_weights(original)
    dtype = state["model.language_model.embed_tokens.weight"].dtype
    # ConvNextModel's pooler LayerNorm has no MGM weights (its output is unused): identity.
    width = aux_config.hidden_sizes[-1]
    state["model.vision_tower_aux.layernorm.weight"] = torch.ones(width, dtype=dtype)
    state["model.vision_tower_aux.layernorm.bias"] = torch.zeros(width, dtype=dtype)
    if any(key.startswith("model.vision_tower.") for key in state):
        vision_config = CLIPVisionConfig.from_pretrained(clip_source)
    else:
        step(f"loading the CLIP tower {clip_source}")
        tower = CLIPVisionModel.from_pretrained(clip_source)
        state.update({f"model.vision_tower.{key}": value for key, value in tower.state_dict().items()})
        vision_config = tower.config

    step("adding <image> and checking the weights")
    # Left padding for batched generation (the original trained with right padding). Given to from_pretrained, so
    # the saved tokenizer config keeps it (an attribute set afterwards is not saved, and the reload pads right).
    saved_settings = {"padding_side": "left"}
    if config.get("tokenizer_model_max_length") is not None:
        saved_settings["model_max_length"] = config["tokenizer_model_max_length"]
    tokenizer = AutoTokenizer.from_pretrained(source, **saved_settings)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    text_config = text_config_from_original(config, family)
    rows = state["model.language_model.embed_tokens.weight"].shape[0]
    vocab_size = max(rows, -(-len(tokenizer) // 64) * 64)
    for seed, key in enumerate(("model.language_model.embed_tokens.weight", "lm_head.weight")):
        if key in state:
            state[key] = grow_vocabulary(state[key], vocab_size, seed)
    text_config.vocab_size = vocab_size
    text_config.pad_token_id = tokenizer.pad_token_id
    views = config.get("image_grid", 1) ** 2 + int(bool(config.get("image_global", False)))
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    slim_config = SlimMiniGeminiConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), vision_config_aux=aux_config.to_dict(),
        image_size_aux=config.get("image_size_aux", 768), image_grid=config.get("image_grid", 1),
        image_global=bool(config.get("image_global", False)), image_token_index=image_token_index,
        image_seq_length=views * patches, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=config.get("mm_vision_select_layer", -2), tie_word_embeddings="lm_head.weight" not in state,
        pad_token_id=tokenizer.pad_token_id, compression=compression,
    )
    slim_config.dtype = dtype
    check_state_dict(SlimMiniGeminiForConditionalGeneration, slim_config, state)

    image_processor = mgm_image_processor(slim_config.image_size_aux)
    processor = SlimMiniGeminiProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_size_aux=slim_config.image_size_aux,
        image_grid=slim_config.image_grid, image_global=slim_config.image_global, base_image_size=vision_config.image_size,
        num_image_tokens=patches, compression=slim_config.compression,
    )

    step(f"writing {output}")
    with tempfile.TemporaryDirectory(prefix="slimvlm-mgm-") as raw, atomic_folder(output) as staging:
        slim_config.save_pretrained(raw)
        save_torch_state_dict({key: tensor.contiguous() for key, tensor in state.items()}, raw)
        del state, original
        model, info = SlimMiniGeminiForConditionalGeneration.from_pretrained(raw, dtype=dtype, output_loading_info=True)
        if any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise ValueError(f"the converted weights do not load strictly: {info}")
        model.generation_config.suppress_tokens = sorted({*(model.generation_config.suppress_tokens or []), image_token_index})
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        base = base_model or f"YanweiLi/{source.resolve().name}"
        card = card_for_model(model, base_model=base)
        card.text += (
            "\n## Source\n\n"
            f"Converted by `slimvlm convert` from the original Mini-Gemini checkpoint `{base}` (revision "
            f"`{revision or snapshot_revision(source) or 'unknown: a local folder'}`), towers: CLIP `{clip_source}`, "
            f"ConvNeXt `{vision_tower_aux or config.get('mm_vision_tower_aux')}`. `<image>` is a real token "
            f"(id {image_token_index}) instead of the original -200. Compression on Mini-Gemini is slimvlm's own design: "
            "no official code applies VisionZip, SparseVLM or VoCo-LLaMA to Mini-Gemini.\n"
        )
        write_model_card(staging, card)
    return output


def mgm_image_processor(size_aux: int):
    """MGM's preprocessing at the aux size (pad to square with the mean colour, bicubic CLIP resize; PIL backend)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": size_aux}, crop_size={"height": size_aux, "width": size_aux},
                                  image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True)


__all__ = ["KEY_MAP", "convert_original_mgm", "is_original_mgm_folder", "map_key", "mgm_image_processor", "open_clip_trunk"]
