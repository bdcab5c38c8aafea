"""Mini-Gemini (specs/mini_gemini.md acceptance 1-10): preprocessing, ConvNeXt and mining parity with in-test
references of the original algorithm, tiny MGM and MGM-HD end to end, conversion from the original layout,
token handling, remote code, VisionZip after mining, SparseVLM and VoCo on the image block, batching,
generation, 4/8-bit.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from builders import (
    sharpen_language_model,
    IMAGE_TOKEN_ID,
    MGM_CONVNEXT,
    MGM_SIZE_AUX,
    make_mgm_processor,
    make_tokenizer,
    random_images,
    tiny_mini_gemini_config,
)
from test_llava_next import (
    assert_batch_generates_what_each_sample_generates_alone,
    assert_voco_two_stage_equals_the_full_mask,
    greedy_without_cache,
)
from test_remote_code import run_isolated
from test_visionzip import reference_visionzip
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from slimvlm import SlimMiniGeminiConfig, SlimMiniGeminiForConditionalGeneration
from slimvlm.conversion.mini_gemini_original import convert_original_mgm, map_key
from slimvlm.sparsevlm import sparsevlm_schedule
from slimvlm.voco import VoCoCache, build_voco_prompt, build_voco_text_prompt

PROMPT = "USER: <image>\n describe the image ASSISTANT:"
PROMPTS = [PROMPT, "USER: <image>\n what ASSISTANT:", "USER: <image>\n how many red circle are there ? ASSISTANT:"]
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SETTINGS = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
VOCO_ID = 5


def slim_mgm(compression=None, hd: bool = False, attn: str = "sdpa", seed: int = 0, **tiny) -> SlimMiniGeminiForConditionalGeneration:
    torch.manual_seed(seed)
    model = SlimMiniGeminiForConditionalGeneration(SlimMiniGeminiConfig(**tiny_mini_gemini_config(hd, **tiny), compression=compression))
    model.set_attn_implementation({"text_config": attn, "vision_config": attn})
    return model.eval()


@pytest.fixture(scope="module")
def images():
    """Landscape, portrait and square noise images."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    sizes = [(50, 80), (90, 40), (64, 64)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()) for h, w in sizes]


# --------------------------------------------------------------------------- the original algorithm, in-test


def reference_preprocess(image, size_aux: int, base: int, grid: int, global_view: bool):
    """§2 step by step: pad to square (mean colour) with PIL, CLIP processor (PIL backend) at S_aux, float32 bilinear
    resize of the normalised tensor, HD crops by explicit slicing plus a second resize for the global view."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in MEAN))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    clip = CLIPImageProcessorPil(size={"shortest_edge": size_aux}, crop_size={"height": size_aux, "width": size_aux},
                                 image_mean=MEAN, image_std=STD)
    aux = clip(canvas, return_tensors="pt")["pixel_values"][0]
    low = F.interpolate(aux[None].float(), size=(base * grid, base * grid), mode="bilinear", align_corners=False)[0]
    if grid == 1:
        return aux, low
    views = [low[:, r * base:(r + 1) * base, c * base:(c + 1) * base] for r in range(grid) for c in range(grid)]
    if global_view:
        views.append(F.interpolate(low[None], size=(base, base), mode="bilinear", align_corners=False)[0])
    return aux, torch.stack(views)


class TimmBlock(nn.Module):
    """timm ConvNeXt block: dwconv 7x7 -> LayerNorm (channels-last, eps 1e-6) -> fc1 -> GELU -> fc2 -> x gamma -> + x."""

    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        y = self.mlp.fc2(F.gelu(self.mlp.fc1(y)))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimmConvNeXt(nn.Module):
    """The trunk MGM keeps (`vision_stem`, `vision_stages`), named as timm names it."""

    def __init__(self, widths, depths, patch=4):
        super().__init__()
        self.vision_stem = nn.Sequential(nn.Conv2d(3, widths[0], patch, stride=patch), LayerNorm2d(widths[0], eps=1e-6))
        self.vision_stages = nn.ModuleList()
        for s, (width, depth) in enumerate(zip(widths, depths)):
            stage = nn.Module()
            stage.downsample = (nn.Sequential(LayerNorm2d(widths[s - 1], eps=1e-6), nn.Conv2d(widths[s - 1], width, 2, stride=2))
                                if s else nn.Identity())
            stage.blocks = nn.Sequential(*[TimmBlock(width) for _ in range(depth)])
            self.vision_stages.append(stage)

    def forward(self, x):
        x, stages = self.vision_stem(x), []
        for stage in self.vision_stages:
            x = stage.blocks(stage.downsample(x))
            stages.append(x)
        return stages


def original_hr_features(stages):
    """§4: every stage bilinearly resized (float32) to stage 0's size, concatenated on channels."""
    size = stages[0].shape[-2:]
    return torch.cat([F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False).to(s.dtype) for s in stages], 1)


def lnl(width_in, width_out):
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width_out))


class OriginalMGM(nn.Module):
    """Mini-Gemini with the original module structure and names (model.vlm_uni_*, model.mm_projector.{0,2}, the CLIP
    tower under vision_tower.vision_tower.vision_model, the timm trunk under vision_tower_aux), for the tiny shapes."""

    def __init__(self, config: SlimMiniGeminiConfig):
        super().__init__()
        self.config = config
        self.llm = LlamaForCausalLM(config.text_config)
        self.clip = CLIPVisionModel(config.vision_config)
        aux = config.vision_config_aux
        self.aux = TimmConvNeXt(aux.hidden_sizes, aux.depths, aux.patch_size)
        width, aux_width, hidden = config.vision_config.hidden_size, sum(aux.hidden_sizes), config.text_config.hidden_size
        self.vlm_uni_query_projector, self.vlm_uni_aux_projector, self.vlm_uni_val_projector = (
            lnl(width, width), lnl(aux_width, width), lnl(aux_width, width))
        self.mm_projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def load_original(self, state: dict):
        renames = [(r"^model\.vision_tower\.vision_tower\.vision_model\.", "clip."), (r"^model\.vision_tower_aux\.", "aux."),
                   (r"^model\.(vlm_uni_\w+|mm_projector)\.", r"\1."), (r"^model\.", "llm.model."), (r"^lm_head\.", "llm.lm_head.")]
        mapped = {}
        for key, value in state.items():
            for pattern, replacement in renames:
                if re.match(pattern, key):
                    mapped[re.sub(pattern, replacement, key)] = value
                    break
        self.load_state_dict(mapped, strict=True)
        return self.eval()

    def mine(self, images, images_aux):
        """§5 verbatim: cells of X_H under each token, single-head attention, nan_to_num, softmax; returns m."""
        side = int(images.shape[1] ** 0.5)
        cell = images_aux.shape[-1] // side
        aux = images_aux.permute(0, 2, 3, 1).reshape(len(images_aux), side, cell, side, cell, -1)
        aux = aux.permute(0, 1, 3, 2, 4, 5).reshape(len(images_aux), side * side, cell * cell, -1)
        query = self.vlm_uni_query_projector(images)
        key = self.vlm_uni_aux_projector(aux)
        value = self.vlm_uni_val_projector(aux)
        attention = (query[:, :, None] @ (key.transpose(-1, -2) / key.shape[-1] ** 0.5)).nan_to_num()
        return (attention.softmax(-1) @ value).mean(2)

    def mined_tokens(self, x_low, x_high, images):
        """§5 + §7: X = X_L + m per view; HD: crops against 2x2 sub-maps, the global view against X_H / 2, [global, crops]."""
        grid, global_view = self.config.image_grid, self.config.image_global
        if grid == 1:
            return x_low + self.mine(x_low, x_high)
        crops, globals_ = x_low[: images * grid * grid], x_low[images * grid * grid:]
        outputs = []
        for b in range(images):
            rows = []
            if global_view:
                global_map = F.interpolate(x_high[b:b + 1].float(), scale_factor=1 / grid, mode="bilinear",
                                           align_corners=False).to(x_high.dtype)
                rows.append(globals_[b:b + 1] + self.mine(globals_[b:b + 1], global_map))
            side = x_high.shape[-1] // grid
            for r in range(grid):
                for c in range(grid):
                    view = crops[b * grid * grid + r * grid + c][None]
                    sub = x_high[b:b + 1, :, r * side:(r + 1) * side, c * side:(c + 1) * side]
                    rows.append(view + self.mine(view, sub))
            outputs.append(torch.cat(rows, 1))
        return torch.cat(outputs)

    def encode_images(self, pixel_values, pixel_values_aux):
        grid = self.config.image_grid
        if grid > 1:
            pixel_values = torch.cat([pixel_values[:, :-1].flatten(0, 1), pixel_values[:, -1:].flatten(0, 1)])
        x_low = self.clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        x_high = original_hr_features(self.aux(pixel_values_aux)).to(x_low.dtype)
        return self.mm_projector(self.mined_tokens(x_low, x_high, len(pixel_values_aux)))

    def logits(self, original_ids, pixel_values, pixel_values_aux):
        """The original prepare_inputs: each -200 replaced by that image's features, then the LLM."""
        features = self.encode_images(pixel_values, pixel_values_aux)
        rows = []
        for ids, image in zip(original_ids, features):
            at = int((ids == -200).nonzero())
            embed = self.llm.get_input_embeddings()
            rows.append(torch.cat([embed(ids[:at]), image, embed(ids[at + 1:])]))
        return self.llm(inputs_embeds=torch.stack(rows)).logits


def original_state_dict(model: SlimMiniGeminiForConditionalGeneration, towers: bool = True) -> dict:
    """A slim model's weights under the original MGM names (the inverse of §11, written out here)."""
    inverse = [
        (r"^model\.language_model\.", "model."), (r"^lm_head\.", "lm_head."),
        (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
        (r"^model\.patch_mining\.query_norm\.", "model.vlm_uni_query_projector.0."),
        (r"^model\.patch_mining\.query_proj\.", "model.vlm_uni_query_projector.1."),
        (r"^model\.patch_mining\.key_norm\.", "model.vlm_uni_aux_projector.0."),
        (r"^model\.patch_mining\.key_proj\.", "model.vlm_uni_aux_projector.1."),
        (r"^model\.patch_mining\.value_norm\.", "model.vlm_uni_val_projector.0."),
        (r"^model\.patch_mining\.value_proj\.", "model.vlm_uni_val_projector.1."),
        (r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
        (r"^model\.vision_tower_aux\.layernorm\.", None),
        (r"^model\.vision_tower_aux\.embeddings\.patch_embeddings\.", "model.vision_tower_aux.vision_stem.0."),
        (r"^model\.vision_tower_aux\.embeddings\.layernorm\.", "model.vision_tower_aux.vision_stem.1."),
        (r"^model\.vision_tower_aux\.encoder\.stages\.(\d)\.downsampling_layer\.(\d)\.", r"model.vision_tower_aux.vision_stages.\1.downsample.\2."),
        (r"^model\.vision_tower_aux\.encoder\.stages\.(\d)\.layers\.(\d+)\.dwconv\.", r"model.vision_tower_aux.vision_stages.\1.blocks.\2.conv_dw."),
        (r"^model\.vision_tower_aux\.encoder\.stages\.(\d)\.layers\.(\d+)\.layernorm\.", r"model.vision_tower_aux.vision_stages.\1.blocks.\2.norm."),
        (r"^model\.vision_tower_aux\.encoder\.stages\.(\d)\.layers\.(\d+)\.pwconv1\.", r"model.vision_tower_aux.vision_stages.\1.blocks.\2.mlp.fc1."),
        (r"^model\.vision_tower_aux\.encoder\.stages\.(\d)\.layers\.(\d+)\.pwconv2\.", r"model.vision_tower_aux.vision_stages.\1.blocks.\2.mlp.fc2."),
        (r"^model\.vision_tower_aux\.encoder\.stages\.(\d)\.layers\.(\d+)\.layer_scale_parameter$", r"model.vision_tower_aux.vision_stages.\1.blocks.\2.gamma"),
    ]
    state = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in inverse:
            if re.match(pattern, key):
                if replacement is not None:
                    state[re.sub(pattern, replacement, key)] = value.clone()
                break
        else:
            raise AssertionError(f"no inverse for {key}")
    if not towers:
        state = {k: v for k, v in state.items() if not k.startswith(("model.vision_tower.", "model.vision_tower_aux."))}
    return state


def reference_for(model) -> OriginalMGM:
    return OriginalMGM(model.config).load_original(original_state_dict(model))


# --------------------------------------------------------------------------------------- 1. preprocessing


@pytest.mark.parametrize("hd", [False, True])
def test_preprocessing_matches_the_original_steps_bit_for_bit(images, hd):
    processor = make_mgm_processor(hd)
    inputs = processor(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
    expected = [reference_preprocess(image, MGM_SIZE_AUX[hd], 48, 2 if hd else 1, hd) for image in images]
    assert torch.equal(inputs["pixel_values_aux"], torch.stack([aux for aux, _ in expected]))
    assert torch.equal(inputs["pixel_values"], torch.stack([low for _, low in expected]))
    assert inputs["pixel_values"].shape == ((3, 5, 3, 48, 48) if hd else (3, 3, 48, 48))
    assert inputs["pixel_values_aux"].shape == (3, 3, MGM_SIZE_AUX[hd], MGM_SIZE_AUX[hd])
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [(5 if hd else 1) * 576] * 3


def test_processor_saves_every_init_argument(tmp_path):
    from slimvlm import SlimMiniGeminiProcessor

    compression = {"method": "visionzip", "dominant": 10, "contextual": 3}
    make_mgm_processor(True, compression).save_pretrained(tmp_path)
    loaded = SlimMiniGeminiProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size_aux, loaded.image_grid, loaded.image_global, loaded.base_image_size, loaded.num_image_tokens) == (
        384, 2, True, 48, 576)
    assert loaded.compression == compression and loaded.tokens_per_image() == 5 * 13


# ---------------------------------------------------------------------------------------- 2. ConvNeXt


def test_convnext_matches_the_timm_block_definition():
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    timm = TimmConvNeXt(MGM_CONVNEXT["hidden_sizes"], MGM_CONVNEXT["depths"]).eval()
    with torch.no_grad():
        for module in timm.modules():
            if isinstance(module, TimmBlock):
                module.gamma.normal_()  # layer scale far from its 1e-6 init, so it shows
    state = {}
    for key, value in timm.state_dict().items():
        new = map_key(f"model.vision_tower_aux.{key}")
        state[new.removeprefix("model.vision_tower_aux.")] = value
    width = MGM_CONVNEXT["hidden_sizes"][-1]
    state.update({"layernorm.weight": torch.ones(width), "layernorm.bias": torch.zeros(width)})
    hf = ConvNextModel(ConvNextConfig(**MGM_CONVNEXT)).eval()
    hf.load_state_dict(state, strict=True)
    config = SlimMiniGeminiConfig(**tiny_mini_gemini_config())
    slim = SlimMiniGeminiForConditionalGeneration(config).model
    slim.vision_tower_aux = hf
    pixels = torch.randn(2, 3, 192, 192)
    with torch.no_grad():
        expected_stages = timm(pixels)
        hidden = hf(pixels, output_hidden_states=True).hidden_states[-4:]
        for ours, theirs in zip(hidden, expected_stages):
            assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= 1e-6
        concatenated = slim.high_resolution_map(pixels)
    expected = original_hr_features(expected_stages)
    assert concatenated.shape == (2, sum(MGM_CONVNEXT["hidden_sizes"]), 48, 48)
    assert float((concatenated - expected).abs().max()) <= 1e-6


# ------------------------------------------------------------------------------------------- 3. mining


@pytest.mark.parametrize("hd", [False, True])
def test_mining_equals_the_formula_exactly(hd):
    model = slim_mgm(hd=hd)
    reference = reference_for(model)
    images, views = 2, model.config.views_per_image
    torch.manual_seed(1)
    x_low = torch.randn(images * views, 576, 32)  # CLIP order: crops of every image, then the globals
    x_high = torch.randn(images, 48, 48 * model.config.image_grid, 48 * model.config.image_grid)
    with torch.no_grad():
        ours = model.model.image_layout(model.model.mine(x_low, x_high), images)
        expected = reference.mined_tokens(x_low, x_high, images)
    assert ours.shape == (images, views * 576, 32)
    assert torch.equal(ours, expected)


# ------------------------------------------------------------------------------ 4. end to end, 6. conversion


@pytest.mark.parametrize("hd", [False, True])
def test_none_equals_the_original_model(images, hd):
    model = slim_mgm(hd=hd)
    reference = reference_for(model)
    inputs = make_mgm_processor(hd)(images=images[:2], text=[PROMPT] * 2, return_tensors="pt")
    original_ids = torch.tensor([[1] + [7] * 3 + [-200] + [8, 9] for _ in range(2)])
    slim_ids = torch.cat([original_ids[:, :4], torch.full((2, model.image_token_count()), IMAGE_TOKEN_ID), original_ids[:, 5:]], 1)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_values_aux"]).pooler_output
        expected_features = reference.encode_images(inputs["pixel_values"], inputs["pixel_values_aux"])
        logits = model(input_ids=slim_ids, pixel_values=inputs["pixel_values"], pixel_values_aux=inputs["pixel_values_aux"]).logits
        expected = reference.logits(original_ids, inputs["pixel_values"], inputs["pixel_values_aux"])
    assert [f.shape[0] for f in features] == [(5 if hd else 1) * 576] * 2
    torch.testing.assert_close(torch.stack(features), expected_features, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hd", [False, True])
def test_generate_encodes_once_and_equals_a_cache_free_loop(images, hd):
    model = slim_mgm(hd=hd)
    processor = make_mgm_processor(hd)
    batch = processor(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    calls = []
    original = model.model.get_image_features

    def counted(*args, **kwargs):
        calls.append(kwargs.get("pixel_values_aux") is not None)
        return original(*args, **kwargs)

    model.model.get_image_features = counted
    with torch.no_grad():
        tokens = model.generate(**batch, **SETTINGS)[:, batch["input_ids"].shape[1]:]
    assert calls == [True]  # once, before prefill, with the high-resolution image routed
    del model.model.get_image_features
    assert tokens.tolist() == greedy_without_cache(model, batch, 4).tolist()


def test_a_wrong_placeholder_count_raises(images):
    model = slim_mgm()
    inputs = make_mgm_processor()(images=images[:1], text=[PROMPT], return_tensors="pt")
    inputs["input_ids"] = inputs["input_ids"][:, 3:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 3:]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**inputs)


def test_the_original_image_index_is_rejected(images):
    model = slim_mgm()
    inputs = make_mgm_processor()(images=images[:1], text=[PROMPT], return_tensors="pt")
    inputs["input_ids"][0, 0] = -200
    with pytest.raises(ValueError, match="-200"):
        model(**inputs)


def source_tokenizer():
    """The original's tokenizer: no <image> token (it used -200)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = make_tokenizer().get_vocab()
    vocab = {token: index for index, token in enumerate(t for t, _ in sorted(words.items(), key=lambda item: item[1])
                                                        if t not in ("<image>", "<voco>"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_original_folder(folder, model, towers: bool = True):
    """An original MGM folder: LM config with mm_* / image_* fields, original weight names, the original tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = model.config.text_config.to_dict()
    config.update(architectures=["MGMLlamaForCausalLM"], model_type="mgm", vocab_size=model.config.text_config.vocab_size,
                  mm_vision_tower="model_zoo/OpenAI/clip-vit-large-patch14-336",
                  mm_vision_tower_aux="model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
                  mm_hidden_size=32, mm_hidden_size_aux=48, mm_projector_type="mlp2x_gelu", use_mm_proj=True,
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_size_aux=model.config.image_size_aux,
                  image_grid=model.config.image_grid, image_global=model.config.image_global, image_aspect_ratio="pad",
                  image_grid_pinpoints=None, optimize_vision_tower=False, optimize_vision_tower_aux=False,
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, tokenizer_padding_side="right",
                  tokenizer_model_max_length=4096)
    (folder / "config.json").write_text(json.dumps(config))
    state = original_state_dict(model, towers)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # legacy buffer: dropped
    save_file(state, folder / "model.safetensors")
    source_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """The fallback towers: the tiny CLIP in transformers layout, the tiny ConvNeXt as an open_clip checkpoint."""
    from safetensors.torch import save_file

    model = slim_mgm(seed=3)
    folder = tmp_path_factory.mktemp("towers")
    model.model.vision_tower.save_pretrained(folder / "clip")
    trunk = {k.replace("model.vision_tower_aux.vision_", "visual.trunk."): v
             for k, v in original_state_dict(model).items() if k.startswith("model.vision_tower_aux.")}
    trunk.update({"visual.trunk.head.norm.weight": torch.ones(16), "visual.head.proj.weight": torch.ones(4, 16),
                  "text.token_embedding.weight": torch.ones(3, 4), "logit_scale": torch.ones(())})
    (folder / "openclip").mkdir()
    save_file(trunk, folder / "openclip" / "open_clip_model.safetensors")
    return model, folder


@pytest.mark.parametrize("with_towers", [True, False])
def test_conversion_is_strict_and_equals_the_original(tmp_path, towers, with_towers):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model = towers[0] if not with_towers else slim_mgm(seed=3)
    source = write_original_folder(tmp_path / "MGM-7B", model, towers=with_towers)
    output = convert_original_mgm(source, tmp_path / "slim", vision_tower=towers[1] / "clip",
                                  vision_tower_aux=towers[1] / "openclip")
    converted, info = SlimMiniGeminiForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    weights = load_file(output / "model.safetensors")
    assert torch.equal(weights["model.vision_tower_aux.layernorm.weight"], torch.ones(16))
    assert torch.equal(weights["model.vision_tower_aux.layernorm.bias"], torch.zeros(16))
    # 7. token handling: <image> is a real special token at len(tokenizer), its rows are finite, generation suppresses it
    tokenizer = AutoTokenizer.from_pretrained(output)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(source_tokenizer()) == converted.config.image_token_id
    assert "<image>" in tokenizer.all_special_tokens
    assert converted.config.text_config.vocab_size % 64 == 0
    assert torch.isfinite(converted.get_input_embeddings().weight).all() and torch.isfinite(converted.lm_head.weight).all()
    assert image_id in converted.generation_config.suppress_tokens
    card = (output / "README.md").read_text()
    assert "YanweiLi/MGM-7B" in card and "Source" in card
    # logits equal the original structure on the original's -200 input
    reference = OriginalMGM(model.config).load_original(original_state_dict(model))
    from slimvlm import SlimMiniGeminiProcessor

    processor = SlimMiniGeminiProcessor.from_pretrained(output)
    inputs = processor(images=random_images(1, 60), text=["USER: <image>\n what"], return_tensors="pt")
    ids = inputs["input_ids"][0]
    at = int((ids == image_id).nonzero()[0])
    original_ids = torch.cat([ids[:at], torch.tensor([-200]), ids[at + 576:]])[None]
    with torch.no_grad():
        logits = converted.eval()(**inputs).logits
        expected = reference.logits(original_ids, inputs["pixel_values"], inputs["pixel_values_aux"])
    vocab = model.config.text_config.vocab_size
    torch.testing.assert_close(logits[..., :vocab], expected, rtol=0, atol=1e-5)


def test_converted_processor_reloads_left_padding_and_a_padded_batch_equals_each_sample_alone(tmp_path, towers, images):
    from slimvlm import SlimMiniGeminiProcessor

    source = write_original_folder(tmp_path / "MGM-7B", slim_mgm(seed=3))
    output = convert_original_mgm(source, tmp_path / "slim", vision_tower=towers[1] / "clip",
                                  vision_tower_aux=towers[1] / "openclip")
    processor = SlimMiniGeminiProcessor.from_pretrained(output)
    assert processor.tokenizer.padding_side == "left" and processor.tokenizer.model_max_length == 4096
    model = SlimMiniGeminiForConditionalGeneration.from_pretrained(output).eval()
    prompts = ["USER: <image>\n what ASSISTANT:", "USER: <image>\n how many red circle are there ? ASSISTANT:"]
    batch = processor(images=images[:2], text=prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and bool(batch["attention_mask"][:, -1].all())  # row 0 padded on the left
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        for i, prompt in enumerate(prompts):
            alone = processor(images=images[i:i + 1], text=[prompt], return_tensors="pt")
            torch.testing.assert_close(together[i], model(**alone).logits[0, -1], rtol=0, atol=1e-5)


def test_conversion_fails_on_an_unknown_key(tmp_path):
    from safetensors.torch import load_file, save_file

    source = write_original_folder(tmp_path / "MGM-7B", slim_mgm())
    state = load_file(source / "model.safetensors")
    state["model.vlm_uni_extra_projector.0.weight"] = torch.ones(2)
    save_file(state, source / "model.safetensors")
    with pytest.raises(ValueError, match="vlm_uni_extra_projector"):
        convert_original_mgm(source, tmp_path / "slim")
    assert not (tmp_path / "slim").exists()


# -------------------------------------------------------------------------------------- batching, methods


METHODS = [{"method": "none"}, {"method": "visionzip", "dominant": 54, "contextual": 10},
           {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
           {"method": "cdpruner", "tokens": 16}, {"method": "divprune", "tokens": 16}]


@pytest.mark.parametrize("compression", METHODS)
def test_left_padded_batch_generates_what_each_sample_generates_alone(images, compression):
    model = slim_mgm(compression)
    processor = make_mgm_processor(False, model.config.compression)
    assert_batch_generates_what_each_sample_generates_alone(model, processor, images, PROMPTS)


# ------------------------------------------------------------------------------------------- 9. VisionZip


def eager_tower(model):
    config = CLIPVisionConfig(**model.config.vision_config.to_dict())
    config._attn_implementation = "eager"
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    return tower


@pytest.mark.parametrize("hd", [False, True])
def test_visionzip_after_mining_counts_selection_and_backends(images, hd):
    d, c = 10, 3
    compression = {"method": "visionzip", "dominant": d, "contextual": c}
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = slim_mgm(compression, hd=hd, attn=attn)
        processor = make_mgm_processor(hd, compression)
        inputs = processor(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
        with torch.no_grad():
            outputs[attn] = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_values_aux"])
    views = 5 if hd else 1
    features = outputs["sdpa"].pooler_output
    assert [f.shape[0] for f in features] == [views * (d + c)] * 2 == (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert model.image_token_count() == views * (d + c)
    for ours, eager in zip(features, outputs["eager"].pooler_output):
        torch.testing.assert_close(ours, eager, rtol=0, atol=1e-5)
    # the selection is the one an eager CLIP's CLS attention gives (views in CLIP order: crops, then globals)
    clip_input = model.model.clip_views(inputs["pixel_values"])
    reference = reference_visionzip(eager_tower(model), clip_input, d, c)
    assert [set(row.tolist()) for row in outputs["sdpa"].dominant_indices] == [view[1] for view in reference]
    # mined patches are selected: the dominant patches of the first image's first view, projected, in ascending order
    x_low = model.model.vision_tower(clip_input, output_hidden_states=True).hidden_states[-2]
    high = model.model.high_resolution_map(inputs["pixel_values_aux"])
    with torch.no_grad():
        mined = torch.cat([x_low[:, :1], model.model.mine(x_low[:, 1:], high)], 1)
        first = 0 if not hd else 2 * 4  # the first image's global view comes first in its token order
        kept = sorted(reference[first][1])
        expected = model.model.multi_modal_projector(mined[first, kept])
    torch.testing.assert_close(features[0][:d], expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert model.generate(**inputs, **SETTINGS).shape[0] == 2


# ------------------------------------------------------------------------------------ SparseVLM and VoCo


@pytest.mark.parametrize("hd", [False, True])
def test_sparsevlm_prunes_the_image_block_on_the_scaled_schedule(images, hd):
    compression = {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]}
    model = slim_mgm(compression, hd=hd)
    inputs = make_mgm_processor(hd, model.config.compression)(images=images[:2], text=PROMPTS[:2], return_tensors="pt",
                                                                padding=True)
    with torch.no_grad():
        model(**inputs)
    report = model.sparsevlm_report
    assert report.visual_tokens == [2880 if hd else 576] * 2
    for v, counts in zip(report.visual_tokens, report.layer_counts):
        assert counts == sparsevlm_schedule(model.config.compression, v, 2).after


def test_voco_two_stage_equals_the_full_mask_forward(images):
    model = slim_mgm({"method": "voco", "num_voco_tokens": 2}, attn="eager")
    model.config.voco_token_id = VOCO_ID
    sharpen_language_model(model)  # masking and position errors must show in the logits
    processor = make_mgm_processor(False, model.config.compression)
    questions = ["what is the color of the circle ?", "how many are there ?"]
    inputs = processor(images=images[:2], text=[build_voco_prompt(q) for q in questions], return_tensors="pt", padding=True)
    for row in inputs["input_ids"]:  # one VoCo group after the image block
        voco, image = (row == VOCO_ID).nonzero().flatten(), (row == IMAGE_TOKEN_ID).nonzero().flatten()
        assert len(voco) == 2 and int(voco[0]) > int(image[-1]) and len(image) == 576
    text = processor.tokenizer([build_voco_text_prompt(q) for q in questions], add_special_tokens=False, return_tensors="pt",
                               padding=True)
    cache = assert_voco_two_stage_equals_the_full_mask(model, inputs, text)
    assert isinstance(cache, VoCoCache)


# ----------------------------------------------------------------------------------- 8. remote code, 10. bnb


def test_remote_code_round_trip(tmp_path, images):
    from safetensors.torch import load_file

    compression = {"method": "visionzip", "dominant": 10, "contextual": 3}
    model = slim_mgm(compression, hd=True)
    processor = make_mgm_processor(True, compression)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert {"modeling_mini_gemini.py", "modeling_slimvlm.py", "processing_slimvlm.py"} <= {p.name for p in folder.iterdir()}
    images[0].save(tmp_path / "image.png")
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None)
    out = tmp_path / "out.safetensors"
    report = run_isolated([{"folder": str(folder), "image": str(tmp_path / "image.png"), "prompt": PROMPT,
                            "out": str(out), "new_tokens": 3}], tmp_path / "isolated")
    assert report["slimvlm_importable"] is False
    result = report["results"][0]
    assert result["model_class"].endswith("modeling_mini_gemini.SlimMiniGeminiForConditionalGeneration")
    assert result["processor_class"].endswith("processing_slimvlm.SlimMiniGeminiProcessor")
    assert result["compression"] == compression == result["processor_compression"]
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["tokens"] == tokens[:, inputs["input_ids"].shape[1]:].tolist()
    torch.testing.assert_close(load_file(out)["logits"], logits, rtol=0, atol=1e-5)


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading_keeps_both_towers_mining_and_projector_full_precision(tmp_path, images, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    slim_mgm(text_hidden=64, vision_hidden=64).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    model = SlimMiniGeminiForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu",
        compression={"method": "visionzip", "dominant": 10, "contextual": 3}).eval()
    for name in ("vision_tower", "vision_tower_aux", "patch_mining", "multi_modal_projector"):
        linears = [m for m in getattr(model.model, name).modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears), name
    assert type(model.model.language_model.layers[0].self_attn.k_proj) is not torch.nn.Linear
    inputs = make_mgm_processor(False, model.config.compression)(images=images[:2], text=PROMPTS[:2], return_tensors="pt",
                                                                   padding=True)
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[0] == 2


# ------------------------------------------------------------------------------------------ 5. LLM variants


def text_variant(family: str) -> dict:
    from transformers import AutoConfig

    extra = {"mixtral": dict(num_local_experts=2, num_experts_per_tok=1), "gemma": dict(head_dim=8)}.get(family, {})
    return AutoConfig.for_model(family, vocab_size=49, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **extra).to_dict()


@pytest.mark.parametrize("family", ["mistral", "mixtral", "gemma"])
def test_other_language_models_build_through_automodel_and_generate(images, family):
    torch.manual_seed(0)
    config = SlimMiniGeminiConfig(**{**tiny_mini_gemini_config(), "text_config": text_variant(family)})
    model = SlimMiniGeminiForConditionalGeneration(config).eval()
    assert model.model.language_model.config.model_type == family
    if family == "gemma":
        assert config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    inputs = make_mgm_processor()(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model.generate(**inputs, **SETTINGS).shape[0] == 2


def test_mixtral_legacy_per_expert_keys_load_fused(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = SlimMiniGeminiForConditionalGeneration(
        SlimMiniGeminiConfig(**{**tiny_mini_gemini_config(), "text_config": text_variant("mixtral")})).eval()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    prefix = "model.language_model.layers.{}."
    for layer in range(2):
        p = prefix.format(layer)
        if p + "mlp.experts.gate_up_proj" in state:  # write the legacy layout by hand (w1 then w3; w2)
            gate_up, down = state.pop(p + "mlp.experts.gate_up_proj"), state.pop(p + "mlp.experts.down_proj")
            for e in range(2):
                w1, w3 = gate_up[e].chunk(2)
                state.update({f"{p}block_sparse_moe.experts.{e}.w1.weight": w1, f"{p}block_sparse_moe.experts.{e}.w3.weight": w3,
                              f"{p}block_sparse_moe.experts.{e}.w2.weight": down[e]})
            state[p + "block_sparse_moe.gate.weight"] = state.pop(p + "mlp.gate.weight")
    assert any("block_sparse_moe.experts.1.w3" in key for key in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = SlimMiniGeminiForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_slimvlm_convert_takes_an_original_mgm_folder(tmp_path, towers):
    from slimvlm.cli import main

    source = write_original_folder(tmp_path / "MGM-7B-HD", slim_mgm(hd=True))
    assert main(["convert", str(source), str(tmp_path / "slim"), "--compression", '{"method": "visionzip", "tokens": 16}',
                 "--base-model", "YanweiLi/MGM-7B-HD", "--vision-tower", str(towers[1] / "clip")]) == 0
    model = SlimMiniGeminiForConditionalGeneration.from_pretrained(tmp_path / "slim")
    assert model.config.compression == {"method": "visionzip", "dominant": 14, "contextual": 2}
    assert model.image_token_count() == 5 * 16 and "YanweiLi/MGM-7B-HD" in (tmp_path / "slim" / "README.md").read_text()


def test_deprecated_cache_keyword_warns_as_the_stock_llava_does(images):
    from builders import tiny_llava_config
    from test_conformance import deprecation_messages
    from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration, LlavaModel

    from slimvlm import compat

    model = slim_mgm()
    inputs = make_mgm_processor(False)(images=images[:1], text=[PROMPT], return_tensors="pt")
    stock = LlavaForConditionalGeneration(LlavaConfig(**tiny_llava_config().to_dict())).eval()
    stock_inputs = {"input_ids": torch.tensor([[1, 7, 8]])}
    for slim, reference in ((model.model, stock.model), (model, stock)):
        cache = {"past_key_values": DynamicCache(config=model.config.text_config)}
        expected = deprecation_messages(reference, **stock_inputs, **cache)
        got = deprecation_messages(slim, **inputs, past_key_values=DynamicCache(config=model.config.text_config))
        assert got == expected
        if compat.cache_keyword(LlavaModel.forward) == "cache":
            assert len(got) == 1 and "past_key_values" in got[0]
