"""Qwen-VL checkpoints as users ship them (M11, M12): remote code in a fresh process without slimvlm, the Auto
classes, and bitsandbytes 4/8-bit with the vision side (`model.visual`, mergers included) in full precision."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from qwen_builders import prompt, qwen2_5_config, qwen3_config, qwen_image_processor, qwen_tokenizer, random_image, sharpen
from test_remote_code import check_auto_classes, check_remote_round_trip

from slimvlm import (
    SlimQwen2_5_VLConfig,
    SlimQwen2_5_VLForConditionalGeneration,
    SlimQwen2_5_VLProcessor,
    SlimQwen3VLConfig,
    SlimQwen3VLForConditionalGeneration,
    SlimQwen3VLProcessor,
)

VISIONZIP = {"method": "visionzip", "dominant_ratio": 0.45, "contextual_ratio": 0.05}
FAMILIES = {
    "qwen2_5_vl": (qwen2_5_config, SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor, 14),
    "qwen3_vl": (qwen3_config, SlimQwen3VLConfig, SlimQwen3VLForConditionalGeneration, SlimQwen3VLProcessor, 16),
}


def build(family: str, compression):
    make_config, config_class, model_class, processor_class, patch = FAMILIES[family]
    torch.manual_seed(0)
    model = sharpen(model_class(config_class(**make_config().to_dict(), compression=compression))).eval()
    processor = processor_class(image_processor=qwen_image_processor(patch_size=patch), tokenizer=qwen_tokenizer(),
                                compression=compression)
    return model, processor


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_code_round_trip_in_a_fresh_process(family, tmp_path):
    model, processor = build(family, VISIONZIP)
    image = random_image(56, 84, 1)
    Image.fromarray(image).save(tmp_path / "image.png")
    inputs = processor(images=[Image.open(tmp_path / "image.png")], text=[prompt()], return_tensors="pt")
    assert int((inputs["input_ids"] == 290).sum()) == 3
    check_remote_round_trip(model, processor, inputs, {"image": str(tmp_path / "image.png")}, prompt(), tmp_path,
                            type(model).__name__, type(processor).__name__)
    reloaded = check_auto_classes(model, processor, tmp_path / "auto")
    assert reloaded.compression == VISIONZIP
    assert not (tmp_path / "auto" / "video_preprocessor_config.json").exists()  # spec §10: no stock video processor


bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_language_model_vision_in_full_precision(family, bits, tmp_path):
    from builders import load_quantized

    model, processor = build(family, VISIONZIP)
    model.save_pretrained(tmp_path)
    quantized = load_quantized(type(model), tmp_path, bits)
    kinds = {name: type(module).__name__ for name, module in quantized.named_modules() if "Linear" in type(module).__name__}
    language = {name: kind for name, kind in kinds.items() if name.startswith("model.language_model.")}
    assert set(language.values()) == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    rest = {name: kind for name, kind in kinds.items() if not name.startswith("model.language_model.")}
    assert rest and set(rest.values()) == {"Linear"} and any("merger" in name for name in rest)
    assert all(name.startswith(("model.visual.", "lm_head")) for name in rest)
    inputs = processor(images=[random_image(56, 84, 2)], text=[prompt()], return_tensors="pt")
    generated = quantized.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert "Qwen2_5_VLVisionBlock" in model._no_split_modules or "Qwen3VLVisionBlock" in model._no_split_modules


def test_processor_loads_from_a_stock_folder_without_torchvision(tmp_path):
    """A stock Qwen2.5-VL processor folder (Qwen2VLImageProcessor + a torchvision video processor config) loads into
    the Slim processor: the PIL image processor, the frame preprocessing for videos."""
    import json

    qwen_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 1003520, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "processor_class": "Qwen2_5_VLProcessor"}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    processor = SlimQwen2_5_VLProcessor.from_pretrained(tmp_path, compression={"method": "visionzip"})
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    inputs = processor(images=[random_image(56, 84)], videos=[torch.zeros(4, 3, 56, 84, dtype=torch.uint8)],
                       text=[prompt() + " <|vision_start|><|video_pad|><|vision_end|>"], return_tensors="pt")
    assert int((inputs["input_ids"] == 290).sum()) == 3 and inputs["video_grid_thw"].shape == (1, 3)
