"""Original LLaVA training-code checkpoints -> stock and slim checkpoints (issue 14, item 3).

Synthetic tiny checkpoints in the original layout (LLaVA-1.5 and 1.6/anyres, with and without tower keys) are
made from a stock model by renaming its weights back; the conversion must give that model's logits exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import make_tokenizer, random_images, tiny_llava_config
from safetensors.torch import save_file
from transformers import (CLIPImageProcessor, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor)

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaNextForConditionalGeneration
from slimvlm.conversion.llava_original import convert_original_llava, is_original_llava_folder
from slimvlm.conversion.slim_checkpoint import convert_to_slim

PROMPT = "USER: <image>\n what is the color of the circle ? ASSISTANT:"
PINPOINTS = [[24, 48], [48, 24], [48, 48]]


def to_original_key(key: str, with_tower: bool) -> str | None:
    """transformers' name -> the original LLaVA code's."""
    for new, old in (("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                     ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")):
        if key.startswith(new):
            return None if old.startswith("model.vision_tower") and not with_tower else old + key[len(new):]
    return key  # lm_head.weight, model.image_newline


def write_original(model, folder: Path, with_tower: bool, anyres: bool, bin_format: bool = False) -> Path:
    """`model` (stock LLaVA / LLaVA-NeXT) saved as the original code saves it; its tower (config, processor and,
    without tower keys, weights) as a separate CLIP folder `folder/../tower`."""
    folder.mkdir(parents=True)
    text = model.config.text_config
    config = {**{k: v for k, v in text.to_dict().items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
              "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")},
              "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_hidden_size": model.config.vision_config.hidden_size,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": False,
              "image_aspect_ratio": "anyres" if anyres else "pad", "tune_mm_mlp_adapter": False}
    if anyres:
        config.update(image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial_unpad")
    (folder / "config.json").write_text(json.dumps(config))
    state = {to_original_key(k, with_tower): v.clone().contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if k is not None}
    if bin_format:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors")
    make_tokenizer().save_pretrained(folder)
    tower = folder.parent / "tower"
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(model.config.vision_config)
    vision.load_state_dict(model.model.vision_tower.state_dict())
    size = model.config.vision_config.image_size
    if with_tower:
        model.config.vision_config.save_pretrained(tower)  # the config only: the weights must come from the checkpoint
    else:
        vision.save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(tower)
    return folder


def stock_llava(seed: int = 0):
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(image_size=24, patch_size=4)).eval()


def stock_llava_next(seed: int = 0):
    torch.manual_seed(seed)
    base = tiny_llava_config(image_size=24, patch_size=4)
    config = LlavaNextConfig(vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
                             image_token_index=base.image_token_index, image_grid_pinpoints=PINPOINTS,
                             tie_word_embeddings=False)
    return LlavaNextForConditionalGeneration(config).eval()


def inputs_for(processor, count: int = 2):
    return processor(images=random_images(count, size=40, seed=5), text=[PROMPT] * count, padding=True, return_tensors="pt")


@pytest.mark.parametrize("with_tower", [True, False], ids=["tower-keys", "named-tower"])
def test_llava_15_original_converts_to_the_same_logits(tmp_path, with_tower):
    direct = stock_llava()
    source = write_original(direct, tmp_path / "original", with_tower, anyres=False, bin_format=not with_tower)
    assert is_original_llava_folder(source)
    out = convert_original_llava(source, tmp_path / "stock", vision_tower=tmp_path / "tower")
    converted = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = LlavaProcessor.from_pretrained(out)
    inputs = inputs_for(processor)
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, direct(**inputs).logits)
    slim = convert_to_slim(source, tmp_path / "slim", {"method": "none"}, base_model="liuhaotian/llava-v1.5-7b",
                           vision_tower=tmp_path / "tower")
    with torch.no_grad():
        assert torch.equal(SlimLlavaForConditionalGeneration.from_pretrained(slim)(**inputs).logits, direct(**inputs).logits)
    assert (slim / "README.md").exists() and (slim / "modeling_llava.py").exists()


@pytest.mark.parametrize("with_tower", [True, False], ids=["tower-keys", "named-tower"])
def test_llava_16_anyres_original_converts_to_stock_llava_next(tmp_path, with_tower):
    direct = stock_llava_next()
    source = write_original(direct, tmp_path / "original", with_tower, anyres=True)
    out = convert_original_llava(source, tmp_path / "next", vision_tower=tmp_path / "tower")
    converted = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    processor = LlavaNextProcessor.from_pretrained(out)
    assert converted.config.image_grid_pinpoints == PINPOINTS
    assert isinstance(processor.image_processor, LlavaNextImageProcessor)
    inputs = inputs_for(processor)
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, direct(**inputs).logits)
    assert torch.equal(converted.model.image_newline, direct.model.image_newline)


def test_an_unknown_key_fails_and_nothing_is_written(tmp_path):
    source = write_original(stock_llava(), tmp_path / "original", True, anyres=False)
    state = {"model.mm_projector.4.weight": torch.zeros(2, 2)}
    save_file(state, source / "extra.safetensors")
    with pytest.raises(ValueError, match=r"'model\.mm_projector\.4\.weight' has no slimvlm mapping"):
        convert_original_llava(source, tmp_path / "out", vision_tower=tmp_path / "tower")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original", "tower"]  # no output, no staging folder


def test_a_missing_weight_fails(tmp_path):
    source = write_original(stock_llava(), tmp_path / "original", True, anyres=False)
    from safetensors.torch import load_file

    state = load_file(source / "model.safetensors")
    del state["model.mm_projector.2.bias"]
    save_file(state, source / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.multi_modal_projector.linear_2.bias'\]"):
        convert_original_llava(source, tmp_path / "out", vision_tower=tmp_path / "tower")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("mm_projector_type", "linear"), ("mm_use_im_start_end", True),
                                          ("mm_vision_select_feature", "cls")])
def test_configs_the_stock_classes_cannot_express_are_refused(tmp_path, field, value):
    source = write_original(stock_llava(), tmp_path / "original", True, anyres=False)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"{field} = {value!r} is not supported; allowed"):
        convert_original_llava(source, tmp_path / "out", vision_tower=tmp_path / "tower")


def test_the_cli_converts_an_original_folder(tmp_path, capsys):
    from slimvlm.cli import main

    source = write_original(stock_llava(), tmp_path / "original", False, anyres=False)
    assert main(["convert", str(source), str(tmp_path / "slim"), "--compression", '{"method": "visionzip", "tokens": 16}',
                 "--base-model", "liuhaotian/llava-v1.5-7b", "--vision-tower", str(tmp_path / "tower")]) == 0
    assert SlimLlavaForConditionalGeneration.from_pretrained(tmp_path / "slim").image_token_count() == 16
    next_source = write_original(stock_llava_next(), tmp_path / "next" / "original", False, anyres=True)
    # An original 1.6 (anyres) folder converts straight into a slim LLaVA-NeXT checkpoint.
    assert main(["convert", str(next_source), str(tmp_path / "next-slim"), "--compression", '{"method": "visionzip", "tokens": 16}',
                 "--base-model", "liuhaotian/llava-v1.6-vicuna-7b", "--vision-tower", str(tmp_path / "next" / "tower")]) == 0
    slim_next = SlimLlavaNextForConditionalGeneration.from_pretrained(tmp_path / "next-slim")
    assert slim_next.config.compression["dominant"] + slim_next.config.compression["contextual"] == 16
    assert main(["convert-original", str(next_source), str(tmp_path / "next-stock"),
                 "--vision-tower", str(tmp_path / "next" / "tower")]) == 0
    assert LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "next-stock").config.image_grid_pinpoints == PINPOINTS


def test_voco_without_a_token_fails_before_an_original_folder_is_read(tmp_path, monkeypatch):
    """The `<voco>` check runs before the original converter reads any weight (issue 18)."""
    import slimvlm.conversion.llava_original as original

    source = write_original(stock_llava(), tmp_path / "original", with_tower=False, anyres=False)
    make_tokenizer(voco=False).save_pretrained(source)

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the <voco> check")

    monkeypatch.setattr(original, "read_state_dict", refuse)
    with pytest.raises(ValueError, match="needs a <voco> token, and this checkpoint's tokenizer has none"):
        convert_to_slim(source, tmp_path / "slim", {"method": "voco", "num_voco_tokens": 1},
                        base_model="liuhaotian/llava-v1.5-7b", vision_tower=tmp_path / "tower")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original", "tower"]
