"""Accelerator benchmark at real 7B shapes: TTFT, prefill, decoding speed and peak memory, every method against
the uncompressed model in the same run. One command, no download (random weights from the configs in
benchmarks/configs/, which hold the published config.json shapes).

    python benchmarks/bench_gpu.py [--device cuda|cpu] [--tiny] [--quick] [--families ...] [--output results.json]

Families (registry `FAMILIES`): LLaVA-1.5-7B (one 336-px image, 576 tokens), LLaVA-NeXT-7B (a 672x672 image: 2x2
grid + base view, 2,928 tokens), Video-LLaVA-7B (8 frames, 2,056 tokens), MGM-7B-HD (2x2 crops + global view,
2,880 tokens), LLaVA-OneVision-7B (Qwen2-7B, SigLIP-so400m 384/14 without CLS; a 1152x1152 image: 3x3 grid +
base view, 7,371 tokens; VisionZip 128/64/32 per view = 1280/640/320, scored by the attention each patch
receives), Qwen2.5-VL-7B with a 448x448 image (256 tokens) and with a 1008x1008 image (1,296 tokens; VisionZip
retain 0.5/0.25/0.1 per image, scored by the attention received in the last block's segments; its FLOPs are
benchmarks/bench_speed_qwen.py's tower + merger model), Qwen3-VL-8B with a 448x448 image (196 tokens; the same
retain ratios, the keep mask applied to every DeepStack level too; no windows). Settings per family: uncompressed; VisionZip at the paper budgets (192/128/64; 5-view families
640/320/160; video 17 per frame = 136); SparseVLM at the same visual-token budgets (video: the paper's 194 equal
tokens); VoCo-LLaMA with K=1 (per frame for video) answering from its compressed cache; CDPruner (relevance
"llm_embeddings": the random models have no CLIP relevance encoder; a fixed 35-token instruction passed as
`relevance_input_ids`, the processor-free form) and DivPrune at VisionZip's budgets, K per view (scope "view";
--tiny: the smallest budget only). A method a family's config refuses (ValueError) is a row with "skipped"
(the reason), never measured. Each installed
attention implementation (sdpa; flash_attention_2 when importable). Models are built directly on the device
in bf16 (no fp32 copy on the host first), batch 1, a 40-token prompt.

Measured per row (CUDA events on GPU, perf_counter on CPU; median of --repeats after a warm-up):
- vision_ms: the vision side as `generate()` runs it before prefill (tower + VisionZip's step; VoCo: the
  one-off voco_compress of the image prefix, which answering from the cache does not repeat);
- prefill_ms: one forward of the whole prompt (pixels to the first logits; VoCo: the question on its cache);
- ttft_ms: generate(max_new_tokens=1) in the row's decode mode;
- decode_tokens_per_s: (N - 1) / (t(N new tokens) - t(1 new token)), decode mode "static+compile(fullgraph)"
  (cache_implementation="static", torch.compile fullgraph via generate's CompileConfig) on CUDA; where that
  fails the error is recorded in the row and the row falls back to eager decoding (static, then dynamic cache);
  on CPU no compile is attempted (the row says so) unless --cpu-compile (fullgraph capture, eager backend);
- peak_memory_bytes: peak memory above the resident weights during the prefill (CUDA: max_memory_allocated;
  CPU: a torch dispatch-mode tracker of every tensor storage alive, which does not see kernel-internal scratch);
- method_step_peak_bytes (and method_step_ms): the method's own step alone, on real-shape tensors: VisionZip's
  CLS row + selection + merge over all views at layer L-2, SparseVLM's first prune step (rater rows x visual
  columns, scores, top-k, recycling), VoCo's stage 1 (voco_compress), CDPruner's relevance + min-max + DPP greedy
  MAP and DivPrune's selection on the projected candidates of every view (MGM's patch mining not included; the
  DPP / DivPrune kernels are N x N per view, N = a view's candidates); the "memory never worse" check compares
  it with the uncompressed prefill peak at the same shape and is printed per family x method;
- speedup: uncompressed TTFT / this TTFT (same family and attention implementation, same run);
- flop_ideal_speedup: the ratio of prefill FLOPs (benchmarks/flops.py, the FLOP model of the CPU benchmarks) at
  the depth that ran (full depth at real shapes; VoCo: the question on K cached tokens, the image not rerun);
  CDPruner / DivPrune: the same FLOP model as VisionZip at equal visual tokens, with the full tower and every
  candidate projected (their selection's own FLOPs not counted);
  flop_ideal_speedup_real_shapes: the same at the published shapes and full depth (equal under real shapes).

--real-shape-steps: the memory check at the published widths without a 7B model in memory (each method step on
real-width tensors, only its layer materialised, against the uncompressed KV cache); on CPU it replaces the run.

Any part that fails records "errors": {part: message} in its row; the run never stops for one setting.
--tiny: the same code path at tiny widths (token counts as real, except OneVision's) in seconds, for the test
suite (no timing meaning); the largest and the smallest budget of each method. --quick: sdpa only, the smallest budget per method, fewer repeats and tokens (about 2 minutes on one
H200-class GPU); --time-budget-s skips the remaining rows (recorded as skipped) once spent.
Writes the JSON (--output, default benchmarks/results/gpu.json; after every row the raw rows so far with
"complete": false, so a run stopped from outside keeps what it measured) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import transformers  # noqa: E402
from flops import convnext_flops, llm_layer_flops, mining_flops, prefill_flops  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from slimvlm import (  # noqa: E402
    SlimLlavaConfig,
    SlimLlavaForConditionalGeneration,
    SlimLlavaNextConfig,
    SlimLlavaNextForConditionalGeneration,
    SlimLlavaOnevisionConfig,
    SlimLlavaOnevisionForConditionalGeneration,
    SlimMiniGeminiConfig,
    SlimMiniGeminiForConditionalGeneration,
    SlimQwen2_5_VLConfig,
    SlimQwen2_5_VLForConditionalGeneration,
    SlimQwen3VLConfig,
    SlimQwen3VLForConditionalGeneration,
    SlimVideoLlavaConfig,
    SlimVideoLlavaForConditionalGeneration,
)
from slimvlm.cdpruner import minmax_relevance  # noqa: E402
from slimvlm.configuration_slimvlm import (  # noqa: E402
    SPARSEVLM_BUDGETS,
    SPARSEVLM_LAYERS,
    SPARSEVLM_REFERENCE_TOKENS,
    pruned_count,
    sparsevlm_setting,
    views_pruned_count,
)
from slimvlm.configuration_qwen_vl import qwen_token_count  # noqa: E402
from slimvlm.modeling_qwen2_5_vl import vision_query_key  # noqa: E402
from slimvlm.sparsevlm import (  # noqa: E402
    _rater_queries,
    apply_rope,
    merge_clusters,
    plan_raters,
    plan_step,
    rater_row_attention,
    scaled_budgets,
    sparsevlm_schedule,
    visual_scores,
)
from slimvlm.visionzip import (  # noqa: E402
    cls_attention_and_keys,
    received_attention_and_keys,
    resolve_feature_layer,
    segmented_attention_received,
    select_units,
    unit_scores_and_keys,
    visionzip_select,
)

CONFIGS = ROOT / "benchmarks" / "configs"
METHODS = ("none", "visionzip", "sparsevlm", "voco", "cdpruner", "divprune")
PRUNERS = ("cdpruner", "divprune")
PROMPT_TOKENS = 40
DTYPE = torch.bfloat16

# --tiny: every tower and the LLM 32 wide; patch grids keep the real token counts (24x24 = 576 per view).
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "projection_dim": 32}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2}


# ============================================================================ the family registry

@dataclass(frozen=True)
class Family:
    """What the benchmark needs to know about one family; a new family is one `Family(...)` in FAMILIES.

    name: CLI name. title: the published model. config_file: JSON under benchmarks/configs/ ({"hub_id", "config"}).
    model_class / config_class: the Slim classes. tiny: overrides of `config` for --tiny (merged into the dicts).
    pixels(config, generator) -> the pixel inputs of one sample (CPU tensors; cast and moved by the caller).
    vision(model, pixels) -> what `generate()` encodes before prefill (an output with `pooler_output`).
    views(model, pixels) -> (tower, [V, 3, H, W] views) on which VisionZip scores (its isolated step).
    placeholder_id(config) -> the token id of the visual placeholders. groups: placeholder blocks per sample
    (video: one per frame; VoCo puts its K tokens after each). visionzip(total) -> the compression dict for
    `total` visual tokens; visionzip_split(compression) -> the (dominant, contextual) of one view.
    visionzip_totals / sparsevlm_totals: the paper budgets (visual tokens per sample).
    flop_layout(config, compression) -> (views, tokens per view, projected features, extra FLOPs).
    """

    name: str
    title: str
    config_file: str
    model_class: type
    config_class: type
    tiny: dict
    pixels: Callable
    vision: Callable
    views: Callable
    placeholder_id: Callable
    visionzip: Callable
    visionzip_totals: tuple[int, ...]
    sparsevlm_totals: tuple[int, ...]
    flop_layout: Callable
    groups: int = 1
    visionzip_split: Callable = lambda compression: (compression["dominant"], compression["contextual"])
    sparsevlm_settings: Callable | None = None  # optional override: (num_layers, total, visual) -> compression
    no_attention: tuple[str, ...] = ()  # sub-configs without an attention implementation (MGM's ConvNeXt)
    # Per method, a replacement for the generic isolated step (run, ids, pixels) -> step(): e.g. a family whose
    # vision tower has no CLS row (Qwen, SigLIP) scores its VisionZip step differently.
    method_steps: dict = None
    # CDPruner / DivPrune at the VisionZip budgets: pruner_tokens(total) -> K per view (per frame for video);
    # relevance_key: the input CDPruner's instruction ids go under; pruner_strategy: the candidates of a view
    # ("default" drops CLS, "full" keeps it, as the family's pruned path does).
    pruner_tokens: Callable = lambda total: total
    relevance_key: str = "relevance_input_ids"
    pruner_strategy: str = "default"
    # False: a tower without CLS (SigLIP): VisionZip's step scores by the attention each patch receives
    # (visionzip.received_attention_and_keys, chunked attention_received) and d counts patches.
    vision_cls: bool = True
    # Qwen-style prompts: (start, end) token ids around each placeholder group (config -> ids), inputs the
    # forward also needs (config, input_ids) -> dict (mm_token_type_ids), and the vision side's FLOPs
    # (config, compression) -> float, replacing the ViT + projector model of `flop_layout`.
    bracket: Callable | None = None
    extra_inputs: Callable | None = None
    vision_flops: Callable | None = None
    # --tiny keeps the real token counts (then the real-shape FLOP ratio can be computed from a tiny row).
    tiny_real_counts: bool = True


def _patches(vision) -> int:
    return (vision.image_size // vision.patch_size) ** 2


def _image_pixels(config, generator, views: int | None = None, aux: int | None = None) -> dict:
    side = config.vision_config.image_size
    shape = (1, 3, side, side) if views is None else (1, views, 3, side, side)
    pixels = {"pixel_values": torch.randn(*shape, generator=generator)}
    if aux is not None:
        pixels["pixel_values_aux"] = torch.randn(1, 3, aux, aux, generator=generator)
    return pixels


def _next_pixels(config, generator) -> dict:
    side = config.vision_config.image_size  # a 2x2 grid: the base view + 4 crops
    return {**_image_pixels(config, generator, views=5), "image_sizes": torch.tensor([[2 * side, 2 * side]])}


VIDEO_FRAMES = 8
ONEVISION_GRID = 3  # a 3x3-grid image: base view + 9 crops of 729 SigLIP patches


def _onevision_pixels(config, generator) -> dict:
    side = config.vision_config.image_size  # the image is 3 x 3 views large: best fit the 3x3 pinpoint
    views = 1 + ONEVISION_GRID**2
    return {**_image_pixels(config, generator, views=views),
            "image_sizes": torch.tensor([[ONEVISION_GRID * side, ONEVISION_GRID * side]])}


def _onevision_layout(config, compression):
    patches = _patches(config.vision_config)  # no CLS
    views = 1 + ONEVISION_GRID**2
    # Stock OneVision projects every view's 729 patches before unpadding; VisionZip projects what it keeps.
    return views, patches, None if compression["method"] == "visionzip" else views * patches, 0.0


QWEN_RETAIN = (0.5, 0.25, 0.1)  # VisionZip's retain ratios on Qwen-VL (dominant r - 0.05, contextual 0.05)


def _qwen_grid(side: int, patch: int = 14) -> list[int]:
    return [1, side // patch, side // patch]  # one temporal step of patches (14 px on Qwen2.5-VL, 16 on Qwen3-VL)


def _qwen_visionzip_budgets(side: int, patch: int = 14) -> dict[int, float]:
    """{visual tokens: retain ratio} of one `side`-px image, counted by the library (qwen_token_count)."""
    counts = {}
    for retain in QWEN_RETAIN:
        compression = SlimQwen2_5_VLConfig(compression={"method": "visionzip", "retain_ratio": retain}).compression
        counts[qwen_token_count(compression, _qwen_grid(side, patch), 2)] = retain
    return counts


def _qwen_pixels(side: int) -> Callable:
    def pixels(config, generator) -> dict:
        grid = _qwen_grid(side, config.vision_config.patch_size)
        vision = config.vision_config
        width = 3 * vision.temporal_patch_size * vision.patch_size**2
        return {"pixel_values": torch.randn(grid[1] * grid[2], width, generator=generator),
                "image_grid_thw": torch.tensor([grid])}

    return pixels


def _qwen_vision_flops(side: int) -> Callable:
    def flops(config, compression) -> float:
        from bench_speed_qwen import vision_flops  # the Qwen tower + merger (+ VisionZip's QK^T) of the CPU benchmark

        return vision_flops(config, _qwen_grid(side), compression["method"] == "visionzip")

    return flops


def _qwen3_vision_flops(side: int) -> Callable:
    """Qwen3-VL's tower (every block full attention over the image, a 2-matrix GELU MLP), its merger and one
    DeepStack merger per level, and VisionZip's extra QK^T in the last block (bench_speed_qwen's model, no windows)."""
    def flops(config, compression) -> float:
        vision = config.vision_config
        steps, gh, gw = _qwen_grid(side, vision.patch_size)
        patches, width, ffn = steps * gh * gw, vision.hidden_size, vision.intermediate_size
        block = 2 * patches * (4 * width * width + 2 * width * ffn) + 2 * 2 * patches * gh * gw * width
        mergers = 1 + len(vision.deepstack_visual_indexes)
        total = vision.depth * block + mergers * 2 * (patches // 4) * (4 * width * 4 * width + 4 * width * vision.out_hidden_size)
        return total + (2 * patches * gh * gw * width if compression["method"] == "visionzip" else 0.0)

    return flops


def qwen_visionzip_step(run, ids, pixels) -> Callable:
    """VisionZip's own step on one Qwen2.5-VL image: the last block's q/k after its 2-D RoPE (captured inputs of a
    tower run), attention received within its segments (visionzip.segmented_attention_received, chunked), unit
    scores and keys in raster order, selection and merge of the merged rows: the library's functions."""
    inner = run.model.model
    visual, grid = inner.visual, pixels["image_grid_thw"]
    captured = {}

    def capture(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], cu_seqlens=kwargs["cu_seqlens"],
                        position_embeddings=kwargs["position_embeddings"])

    handle = visual.blocks[-1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            output = visual(pixels["pixel_values"].type(visual.dtype), grid_thw=grid, return_dict=True)
    finally:
        handle.remove()
    return qwen_visionzip_step_on(inner, visual.blocks[-1], captured["hidden"], captured["cu_seqlens"],
                                  captured["position_embeddings"], output.pooler_output, grid,
                                  list(getattr(output, "deepstack_features", None) or ()))


def qwen_visionzip_step_on(inner, block, hidden, cu_seqlens, position_embeddings, merged, grid, deepstack=()) -> Callable:
    """step() = VisionZip on one Qwen image from the scoring block's inputs and the merged rows [n, D] (Qwen3-VL:
    the same keep mask and merge on every DeepStack level's rows too)."""
    merge = inner.visual.spatial_merge_size**2
    order = inner._unit_order(grid)
    counts = inner._visionzip_counts(merged.shape[0])

    def step():
        query, key = vision_query_key(block, hidden, position_embeddings)
        received = segmented_attention_received(query, key, cu_seqlens)
        scores, keys = unit_scores_and_keys(received, key, order, merge)
        selection = select_units(scores, keys, *counts)
        return [selection.apply(rows) for rows in (merged, *deepstack)]

    return step


def _qwen_family(side: int) -> Family:
    return Family(
        name="qwen2.5-vl" if side == 448 else f"qwen2.5-vl-{side}",
        title=f"Qwen2.5-VL-7B ({side}x{side} image)", config_file="qwen2.5-vl-7b.json",
        model_class=SlimQwen2_5_VLForConditionalGeneration, config_class=SlimQwen2_5_VLConfig,
        **_qwen_common(_qwen_visionzip_budgets(side), _qwen_vision_flops(side), side),
        # --tiny: 32 wide, 2 blocks (windowed, then full attention as the real last block); 14-px patches, so the
        # token counts are the real ones.
        tiny={"vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
                                "fullatt_block_indexes": [1], "out_hidden_size": 32},
              "text_config": {**TINY_TEXT, "rope_parameters": {"mrope_section": [2, 1, 1]}}},
    )


def _qwen3_family(side: int) -> Family:
    return Family(
        name="qwen3-vl", title=f"Qwen3-VL-8B ({side}x{side} image)", config_file="qwen3-vl-8b.json",
        model_class=SlimQwen3VLForConditionalGeneration, config_class=SlimQwen3VLConfig,
        **_qwen_common(_qwen_visionzip_budgets(side, 16), _qwen3_vision_flops(side), side),
        # --tiny: 32 wide, 2 blocks, DeepStack after block 0; 16-px patches and the 48x48 position table kept.
        tiny={"vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
                                "deepstack_visual_indexes": [0], "out_hidden_size": 32},
              "text_config": {**TINY_TEXT, "head_dim": 8, "rope_parameters": {"mrope_section": [2, 1, 1]}}},
    )


def _qwen_common(budgets: dict[int, float], vision_flops: Callable, side: int) -> dict:
    """The Family fields the Qwen-VL families share."""
    totals = tuple(budgets)
    return dict(
        pixels=_qwen_pixels(side),
        vision=lambda model, pixels: model.model.get_image_features(**pixels),
        views=None, placeholder_id=lambda config: config.image_token_id,
        visionzip=lambda total: {"method": "visionzip", "retain_ratio": budgets[total]},
        visionzip_totals=totals, sparsevlm_totals=totals, pruner_tokens=lambda total: total,
        flop_layout=None, vision_flops=vision_flops,
        bracket=lambda config: (config.vision_start_token_id, config.vision_end_token_id),
        extra_inputs=lambda config, ids: {"mm_token_type_ids": (ids == config.image_token_id).long()},
        method_steps={"visionzip": qwen_visionzip_step},
    )


def _mgm_layout(config, compression):
    vision, aux = config.vision_config, config.vision_config_aux
    views, patches = config.views_per_image, _patches(vision)
    side = config.image_size_aux // 4  # X_H: the ConvNeXt stem's stride
    crop_pixels = side * side  # the 2x2 crops together cover X_H; the global view mines X_H / image_grid
    global_pixels = (side // config.image_grid) ** 2 if config.image_global else 0
    extra = convnext_flops(aux, config.image_size_aux)
    extra += mining_flops(vision.hidden_size, sum(aux.hidden_sizes), views * patches, crop_pixels + global_pixels)
    projected = None if compression["method"] == "visionzip" else views * patches
    return views, patches + 1, projected, extra


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="llava-1.5", title="LLaVA-1.5-7B", config_file="llava-1.5-7b.json",
            model_class=SlimLlavaForConditionalGeneration, config_class=SlimLlavaConfig,
            tiny={"vision_config": {**TINY_TOWER, "image_size": 48, "patch_size": 2}, "text_config": TINY_TEXT},
            pixels=_image_pixels,
            vision=lambda model, pixels: model.model.get_image_features(**pixels),
            views=lambda model, pixels: (model.model.vision_tower, pixels["pixel_values"]),
            placeholder_id=lambda config: config.image_token_id,
            visionzip=lambda total: {"method": "visionzip", "tokens": total},
            visionzip_totals=(192, 128, 64), sparsevlm_totals=(192, 128, 64),
            flop_layout=lambda config, compression: (1, _patches(config.vision_config) + 1, None, 0.0),
        ),
        Family(
            name="llava-next", title="LLaVA-NeXT-7B (2x2 grid)", config_file="llava-next-7b.json",
            model_class=SlimLlavaNextForConditionalGeneration, config_class=SlimLlavaNextConfig,
            tiny={"vision_config": {**TINY_TOWER, "image_size": 48, "patch_size": 2}, "text_config": TINY_TEXT,
                  "image_grid_pinpoints": [[48, 96], [96, 48], [96, 96], [48, 144], [144, 48]]},
            pixels=_next_pixels,
            vision=lambda model, pixels: model.model.get_image_features(**pixels),
            views=lambda model, pixels: (model.model.vision_tower, pixels["pixel_values"][0]),
            placeholder_id=lambda config: config.image_token_id,
            visionzip=lambda total: {"method": "visionzip", "tokens": total // 5},  # per view, 5 views
            visionzip_totals=(640, 320, 160), sparsevlm_totals=(640, 320, 160), pruner_tokens=lambda total: total // 5,
            # Stock NeXT projects all 5 x 576 patches before unpadding; VisionZip projects what it keeps.
            flop_layout=lambda config, compression: (
                5, _patches(config.vision_config) + 1,
                None if compression["method"] == "visionzip" else 5 * _patches(config.vision_config), 0.0),
        ),
        Family(
            name="video-llava", title="Video-LLaVA-7B (8 frames)", config_file="video-llava-7b.json",
            model_class=SlimVideoLlavaForConditionalGeneration, config_class=SlimVideoLlavaConfig,
            tiny={"vision_config": {**TINY_TOWER, "image_size": 32, "patch_size": 2}, "text_config": TINY_TEXT},
            pixels=lambda config, generator: {"pixel_values_videos": torch.randn(
                1, VIDEO_FRAMES, 3, config.vision_config.image_size, config.vision_config.image_size, generator=generator)},
            vision=lambda model, pixels: model.model.get_video_features(**pixels),
            views=lambda model, pixels: (model.model.video_tower, pixels["pixel_values_videos"][0]),
            placeholder_id=lambda config: config.video_token_id,
            visionzip=lambda total: {"method": "visionzip", "tokens": 64, "video_tokens": total // VIDEO_FRAMES},
            visionzip_split=lambda compression: (compression["video_dominant"], compression["video_contextual"]),
            visionzip_totals=(136,), sparsevlm_totals=(194,), groups=VIDEO_FRAMES,
            pruner_tokens=lambda total: total // VIDEO_FRAMES, relevance_key="relevance_video_input_ids",
            pruner_strategy="full",
            # The paper's 194-token Video-LLaVA setting (README): budgets 132/66/39 of 2,056 at layers 2/6/15.
            sparsevlm_settings=lambda num_layers, total, visual: {
                "method": "sparsevlm", "version": "1.5", "layers": _sparsevlm_layers(num_layers),
                "budget_fractions": [0.064, 0.032, 0.019][: len(_sparsevlm_layers(num_layers))]},
            flop_layout=lambda config, compression: (VIDEO_FRAMES, _patches(config.vision_config) + 1, None, 0.0),
        ),
        Family(
            name="mgm-hd", title="MGM-7B-HD (2x2 crops + global view)", config_file="mgm-7b-hd.json",
            model_class=SlimMiniGeminiForConditionalGeneration, config_class=SlimMiniGeminiConfig,
            tiny={"vision_config": {**TINY_TOWER, "image_size": 48, "patch_size": 2}, "text_config": TINY_TEXT,
                  "vision_config_aux": {"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 2, 1]},
                  "image_size_aux": 384},
            pixels=lambda config, generator: _image_pixels(config, generator, views=config.views_per_image,
                                                           aux=config.image_size_aux),
            vision=lambda model, pixels: model.model.get_image_features(**pixels),
            views=lambda model, pixels: (model.model.vision_tower, model.model.clip_views(pixels["pixel_values"])),
            placeholder_id=lambda config: config.image_token_id,
            visionzip=lambda total: {"method": "visionzip", "tokens": total // 5},  # per view, 5 views
            visionzip_totals=(640, 320, 160), sparsevlm_totals=(640, 320, 160), pruner_tokens=lambda total: total // 5,
            flop_layout=_mgm_layout, no_attention=("vision_config_aux",),
        ),
        Family(
            name="llava-onevision", title="LLaVA-OneVision-7B (3x3 grid)", config_file="llava-onevision-7b.json",
            model_class=SlimLlavaOnevisionForConditionalGeneration, config_class=SlimLlavaOnevisionConfig,
            # --tiny: 14x14-patch views, 2,002 tokens (the real 10 x 27x27 = 7,371 would take ~25 s of the suite's
            # CPU), so its flop_ideal_speedup_real_shapes is left None (tiny_real_counts=False).
            tiny={"vision_config": {**TINY_TOWER, "image_size": 28, "patch_size": 2}, "text_config": TINY_TEXT,
                  "image_grid_pinpoints": [[28 * i, 28 * j] for i in range(1, 4) for j in range(1, 4)]},
            tiny_real_counts=False,
            pixels=_onevision_pixels,
            vision=lambda model, pixels: model.model.get_image_features(**pixels),
            views=lambda model, pixels: (model.model.vision_tower, pixels["pixel_values"][0]),
            placeholder_id=lambda config: config.image_token_id,
            # K per view (10 views), as NeXT's 128/64/32 per view.
            visionzip=lambda total: {"method": "visionzip", "tokens": total // (1 + ONEVISION_GRID**2)},
            visionzip_totals=(1280, 640, 320), sparsevlm_totals=(1280, 640, 320),
            pruner_tokens=lambda total: total // (1 + ONEVISION_GRID**2),
            flop_layout=_onevision_layout, vision_cls=False,
        ),
        _qwen_family(448),
        _qwen_family(1008),
        _qwen3_family(448),
    )
}


def _sparsevlm_layers(num_layers: int) -> list[int]:
    setting = sparsevlm_setting(num_layers, 64)
    return list(setting.get("layers", SPARSEVLM_LAYERS))


def sparsevlm_for(num_layers: int, total: int, visual: int) -> dict:
    """SparseVLM v1.5 aiming at `total` equal tokens of `visual`: the official preset whose share of 576 matches
    (within 5 %; its budgets scale to `visual` as the library does), else the nearest preset's budgets scaled
    to the target, as `budget_fractions`. The row reports the equal tokens the run really had."""
    equivalent = total * SPARSEVLM_REFERENCE_TOKENS / visual
    presets = SPARSEVLM_BUDGETS["1.5"]
    preset = min(presets, key=lambda p: abs(p - equivalent))
    if abs(preset - equivalent) <= 0.05 * preset:
        return sparsevlm_setting(num_layers, preset)
    layers = _sparsevlm_layers(num_layers)
    fractions = [b * equivalent / preset / SPARSEVLM_REFERENCE_TOKENS for b in presets[preset]][: len(layers)]
    return {"method": "sparsevlm", "version": "1.5", "layers": layers, "budget_fractions": fractions}


def settings(family: Family, num_layers: int, visual: int, quick: bool, tiny: bool = False
             ) -> list[tuple[str, int | None, dict]]:
    """(method, budget in visual tokens per sample, compression) rows, the uncompressed one first."""
    def chosen(totals):  # --quick: the smallest budget; --tiny: the largest and the smallest (a smoke test)
        return totals[-1:] if quick else totals[:: max(1, len(totals) - 1)] if tiny else totals

    vz, sv = chosen(family.visionzip_totals), chosen(family.sparsevlm_totals)
    make_sparsevlm = family.sparsevlm_settings or sparsevlm_for
    rows = [("none", visual, {"method": "none"})]
    rows += [("visionzip", total, family.visionzip(total)) for total in vz]
    rows += [("sparsevlm", total, make_sparsevlm(num_layers, total, visual)) for total in sv]
    rows += [("voco", 1, {"method": "voco", "num_voco_tokens": 1})]
    # CDPruner (instruction relevance from the LLM's embeddings: the random models have no CLIP relevance encoder)
    # and DivPrune at VisionZip's budgets; --tiny: the smallest budget only (a smoke test of the path).
    pruners = vz[-1:] if tiny else vz
    # Scope "view" (K per view / frame, as VisionZip's layout) for both, so each keeps the budget exactly.
    rows += [("cdpruner", total, {"method": "cdpruner", "tokens": family.pruner_tokens(total), "scope": "view",
                                  "relevance": "llm_embeddings"}) for total in pruners]
    rows += [("divprune", total, {"method": "divprune", "tokens": family.pruner_tokens(total), "scope": "view"})
             for total in pruners]
    return rows


# ============================================================================ configs and models

def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def family_config(family: Family, tiny: bool, geometry_only: bool = False):
    """(config, hub id); tiny: with the family's --tiny overrides (geometry_only: only the tiny widths, the
    published image geometry, hence the real token counts)."""
    spec = json.loads((CONFIGS / family.config_file).read_text())
    overrides = {"vision_config": TINY_TOWER, "text_config": TINY_TEXT} if geometry_only else family.tiny
    values = _merge(spec["config"], overrides) if tiny else spec["config"]
    return family.config_class(**values), spec["hub_id"]


def build_model(family: Family, device: str, tiny: bool, attn: str, geometry_only: bool = False):
    """Random weights, built on `device` directly in bf16 (no fp32 copy on the host first)."""
    config, _ = family_config(family, tiny, geometry_only)
    torch.manual_seed(0)
    # Every attention-using sub-config gets `attn`; the others (MGM's ConvNeXt) keep their default.
    implementation = {"": attn, **{key: attn for key in config.sub_configs if key not in family.no_attention}}
    with torch.device(device):
        model = family.model_class._from_config(config, dtype=DTYPE, attn_implementation=implementation)
    model.config.voco_token_id = model.config.text_config.vocab_size - 1  # a spare row of the real vocabulary
    return model.eval()


def attention_implementations(device: str, quick: bool) -> list[str]:
    names = ["sdpa"]
    if device == "cuda" and not quick:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            names.append("flash_attention_2")
    return names


# ============================================================================ measurement

class Clock:
    """Median milliseconds of `fn()` over `repeats` calls after `warmup` untimed ones (CUDA events on GPU)."""

    def __init__(self, device: str, warmup: int = 1):
        self.cuda, self.warmup = device == "cuda", warmup

    def __call__(self, fn: Callable, repeats: int, warmup: int | None = None) -> tuple[float, object]:
        result = None
        for _ in range(self.warmup if warmup is None else warmup):
            result = fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                result = fn()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), result


class TensorPeak(TorchDispatchMode):
    """CPU peak memory: bytes of every tensor storage created under the mode and still alive, at its maximum.

    A storage counts from the op that creates it until the last tensor on it made under the mode is freed
    (views keep it; views of older storages are not new memory). Storages made before the mode (weights, inputs) are the baseline, not counted; scratch
    memory inside one kernel is not seen.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {item.untyped_storage().data_ptr() for item in tree_flatten((args, kwargs))[0]
                  if isinstance(item, torch.Tensor) and item.device.type != "meta"}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in inputs and key not in self.live):
                continue  # a view of (or in-place op on) a storage from before the mode: not new memory
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def peak_bytes(fn: Callable, device: str) -> tuple[int, object]:
    """(peak bytes allocated above what was allocated before, result) of one call of `fn()`."""
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, result
    with TensorPeak() as tracker:
        result = fn()
    return tracker.peak, result


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def on_device(inputs: dict, device: str) -> dict:
    return {key: value.to(device=device, dtype=DTYPE if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()}


def visual_count(features) -> int:
    """Visual tokens in a `get_*_features` output's pooler_output (a list of [N, D], or [views, K, D])."""
    pooled = features.pooler_output
    if isinstance(pooled, torch.Tensor):
        return pooled.shape[0] * pooled.shape[1] if pooled.dim() == 3 else pooled.shape[0]
    return sum(item.shape[0] for item in pooled)


INSTRUCTION_TOKENS = PROMPT_TOKENS - 5  # the question after the image


def instruction_ids(device: str) -> torch.Tensor:
    """[1, T] LLM-vocabulary ids of CDPruner's instruction (random, fixed seed, as long as the question)."""
    return torch.randint(3, 32000, (1, INSTRUCTION_TOKENS), generator=torch.Generator().manual_seed(1)).to(device)


def prompt_ids(family: Family, config, visual: int, voco: int, generator) -> tuple[torch.Tensor, int]:
    """[text[:5]; per group: its placeholders (+ `voco` <voco>); text[5:]] and the end of the last VoCo group."""
    text = torch.randint(3, 32000, (PROMPT_TOKENS,), generator=generator)
    per_group = visual // family.groups
    start, end = ([], []) if family.bracket is None else ([family.bracket(config)[0]], [family.bracket(config)[1]])
    group = start + [family.placeholder_id(config)] * per_group + end + [config.voco_token_id] * voco
    ids = torch.cat([text[:5], torch.tensor(group * family.groups), text[5:]]).unsqueeze(0)
    return ids, 5 + len(group) * family.groups


# ============================================================================ one family

@dataclass
class Run:
    family: Family
    model: object
    device: str
    attn: str
    repeats: int
    new_tokens: int
    max_cache_len: int
    clock: Clock
    cpu_compile: bool = False


def decode_configs(device: str, max_cache_len: int, cpu_compile: bool = False) -> list[tuple[str, dict]]:
    """Decode modes to try in order, the first that works is the row's."""
    from transformers import CompileConfig

    static = {"cache_implementation": "static", "max_cache_len": max_cache_len}
    modes = []
    if device == "cuda":
        modes.append(("static+compile(fullgraph)", {**static, "compile_config": CompileConfig(fullgraph=True)}))
        modes.append(("static, eager (compile failed)", {**static, "disable_compile": True}))
    elif cpu_compile:
        # Graph capture only (dynamo with the eager backend, no inductor): shows on CPU whether fullgraph works.
        capture = CompileConfig(fullgraph=True, backend="eager", mode=None)
        capture._compile_all_devices = True
        modes.append(("static+compile(fullgraph, backend=eager, CPU)", {**static, "compile_config": capture}))
        modes.append(("static, eager (compile failed)", {**static, "disable_compile": True}))
    else:
        modes.append(("static, eager (no compile on CPU)", {**static, "disable_compile": True}))
    modes.append(("dynamic, eager (static failed)", {}))
    return modes


def measure_decoding(run: Run, row: dict, generate: Callable) -> None:
    """ttft_ms and decode_tokens_per_s in the first decode mode that works; failures land in row['errors']."""
    common = {"do_sample": False}
    for mode, options in decode_configs(run.device, run.max_cache_len, run.cpu_compile):
        try:
            def one():
                return generate(max_new_tokens=1, **common, **options)

            def many():
                return generate(max_new_tokens=run.new_tokens, min_new_tokens=run.new_tokens, **common, **options)

            if run.clock.warmup:
                many()  # warm-up (compiles in the compile mode)
            ttft, _ = run.clock(one, run.repeats)
            total, out = run.clock(many, run.repeats, warmup=0)
            generated = out.shape[1] if isinstance(out, torch.Tensor) else out.sequences.shape[1]
            row.update(ttft_ms=ttft, decode_mode=mode, decode_new_tokens=run.new_tokens, generate_ms=total,
                       generated_length=generated,
                       # Below timer resolution (tiny shapes) the difference is noise: no rate rather than a wrong one.
                       decode_tokens_per_s=(run.new_tokens - 1) / (total - ttft) * 1e3 if total > ttft else None)
            return
        except Exception as error:  # noqa: BLE001 (record and try the next mode)
            row.setdefault("errors", {})[f"decode {mode}"] = error_text(error)
            if "compile_config" in options:
                torch._dynamo.reset()


def visionzip_step(run: Run, pixels: dict) -> Callable:
    """VisionZip's own work over all views (CLS row + keys at layer L-2, selection, merge) on the real tensors."""
    model, family = run.model, run.family
    tower, views = family.views(model, pixels)
    layer = resolve_feature_layer(model.config.vision_feature_layer, len(tower.encoder.layers))
    with torch.inference_mode():
        hidden = tower(views, output_hidden_states=True).hidden_states
    return visionzip_step_on(tower.encoder.layers[layer], hidden[layer], hidden[layer + 1],
                             *family.visionzip_split(model.config.compression), cls=family.vision_cls)


def visionzip_step_on(layer, layer_input: torch.Tensor, layer_output: torch.Tensor, dominant: int, contextual: int,
                      cls: bool = True):
    """step() = VisionZip on views [V, N, C]: `layer`'s CLS row and keys from its input (cls False: the attention
    every patch receives, never an N x N map at once), selection and merge."""
    score = cls_attention_and_keys if cls else received_attention_and_keys

    def step():
        scores, keys = score(layer, layer_input)
        return visionzip_select(layer_output, scores, keys, dominant, contextual, cls=cls).tokens

    return step


def sparsevlm_step(run: Run, ids: torch.Tensor, pixels: dict) -> Callable:
    """SparseVLM's first prune step on one sample, on the sample's embeddings with its image features."""
    model, family = run.model, run.family
    with torch.inference_mode():
        features = family.vision(model, pixels).pooler_output
        features = torch.cat(list(features)) if not isinstance(features, torch.Tensor) else features.flatten(0, -2)
        hidden = model.get_input_embeddings()(ids)[0]
        visual = ids[0] == family.placeholder_id(model.config)
        hidden[visual] = features.to(hidden.dtype)
    language_model = model.model.language_model
    return sparsevlm_step_on(language_model.layers[model.config.compression["layers"][0]], language_model.rotary_emb,
                             hidden, int(visual.nonzero()[0]), int(visual.sum()), model.config.compression)


def sparsevlm_step_on(layer, rotary_emb, hidden: torch.Tensor, v0: int, v: int, compression: dict) -> Callable:
    """step() = SparseVLM's prune step at `layer` for one sample [L, C] with `v` visual tokens from `v0`: rater
    queries, rater rows x visual columns of the attention, scores, top-k and recycling (DPC-KNN + merge). Its
    inputs (the layer's input and its rotated keys, which the prefill holds anyway) are made before the step."""
    attention = layer.self_attn
    with torch.inference_mode():
        positions = torch.arange(hidden.shape[0], device=hidden.device)[None]
        cos, sin = (t[0] for t in rotary_emb(hidden[None], positions))
        keys = attention.k_proj(layer.input_layernorm(hidden)).view(hidden.shape[0], -1, attention.head_dim)
        keys = apply_rope(keys.transpose(0, 1), cos[None], sin[None])
        rows = v0 + v + plan_raters(hidden, v0, v)
    budget = scaled_budgets(compression, v)[0]
    noise = torch.rand(v, generator=torch.Generator().manual_seed(0))

    def step():
        query = _rater_queries(layer, hidden[rows], cos[rows], sin[rows])
        probs = rater_row_attention(query, keys, rows, attention.scaling)[:, :, v0 : v0 + v]
        scores = visual_scores(probs, compression["version"], None, compression.get("num_priority_heads", 14))
        visual_out = hidden[v0 : v0 + v]
        chosen = plan_step(scores, budget, compression["version"], visual_out, lambda n: noise[:n])
        if chosen.centres.numel():
            return merge_clusters(visual_out[chosen.recycled], chosen.assignment, chosen.centres.numel())
        return visual_out[chosen.kept]

    return step


def pruner_step(run: Run, ids: torch.Tensor, pixels: dict) -> Callable:
    """CDPruner's / DivPrune's own step over one sample's views, on the projected candidates the pruned path
    makes anyway (tower at the feature layer, projector): CDPruner's relevance to the instruction (the LLM's
    embeddings), its min-max over the image and the DPP greedy MAP; DivPrune's max-min diversity selection.
    Mini-Gemini's patch mining (part of every method's vision side) is not in the step."""
    model, family = run.model, run.family
    inner, compression = model.model, model.config.compression
    tower, views = family.views(model, pixels)
    layer = model.config.vision_feature_layer
    with torch.inference_mode():
        hidden = tower(views, output_hidden_states=True).hidden_states
        hidden = torch.cat([hidden[index] for index in (layer if isinstance(layer, (list, tuple)) else [layer])], dim=-1)
        projected = inner.multi_modal_projector(hidden[:, 1:] if family.pruner_strategy == "default" else hidden)
    return pruner_step_on(inner, compression, projected, pixels.get(family.relevance_key))


def pruner_step_on(inner, compression: dict, projected: torch.Tensor, relevance_ids) -> Callable:
    """step() = CDPruner / DivPrune over one sample's projected candidates [V, N, D] (all views one image)."""
    group = [list(range(projected.shape[0]))]

    def step():
        weights = None
        if compression["method"] == "cdpruner":
            rho = inner._relevance(projected, None, None, group, relevance_ids, None)
            weights = minmax_relevance(rho, compression["theta"])
        if compression["scope"] == "view":
            return inner._select(projected, weights, pruned_count(compression, projected.shape[1]))
        count = views_pruned_count(compression, projected.shape[1], projected.shape[0])
        return inner._select(projected.flatten(0, 1)[None], None if weights is None else weights.flatten()[None], count)

    return step


def materialize(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """Give a meta-device module real random bf16 storage on `device` (norm weights 1, biases 0)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    return module


def real_shape_step_check(family: Family, device: str, quick: bool) -> list[dict]:
    """The "memory never worse" check at the published shapes without a 7B model in memory: each method step is
    measured on real-width tensors, with only the layer it uses materialised (the rest of the model stays on the
    meta device; CDPruner / DivPrune: random projected candidates at the LLM's width, CDPruner with the embedding
    table), against the KV cache the uncompressed prefill must hold (every layer's K and V for every prompt
    token), a lower bound of that prefill's peak. A method the family refuses is a row with "skipped". VoCo's step is the uncompressed prefill of the image prefix
    itself (no step of its own to compare), so it is left to the full runs."""
    config, _ = family_config(family, tiny=False)
    # A 32-wide model with the real geometry counts the real visual tokens (--tiny keeps them for most families).
    tiny_model = build_model(family, "cpu", True, "sdpa", geometry_only=not family.tiny_real_counts)
    tiny_pixels = family.pixels(tiny_model.config, torch.Generator().manual_seed(0))
    with torch.device("meta"):
        model = family.model_class._from_config(config, dtype=DTYPE)
    text_config = model.config.text_config
    pixels = family.pixels(model.config, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        visual = visual_count(family.vision(tiny_model, on_device(tiny_pixels, "cpu")))
    tokens = visual + PROMPT_TOKENS
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv_bytes = text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim * tokens * 2
    rows = []
    for method, budget, compression in settings(family, text_config.num_hidden_layers, visual, quick):
        if method not in ("visionzip", "sparsevlm") + PRUNERS:
            continue
        row = {"family": family.name, "setting": f"{method} {budget}", "method": method, "shapes": "real widths",
               "uncompressed_kv_cache_bytes": kv_bytes}
        try:
            model.config.compression = compression  # normalised on assignment
        except ValueError as error:  # a method this family refuses
            row["skipped"] = f"unsupported by this family: {error_text(error)}"
            rows.append(row)
            continue
        try:
            if method == "visionzip" and family.views is None:  # Qwen: the last block (full attention) at real width
                tower, grid = model.model.visual, pixels["image_grid_thw"]
                block = materialize(tower.blocks[-1], device)
                patches, width = int(grid.prod()), model.config.vision_config.hidden_size
                head_dim = width // model.config.vision_config.num_heads
                hidden = torch.randn(patches, width, generator=generator).to(device, DTYPE)
                angles = torch.rand(patches, head_dim, generator=generator).to(device)
                merged = torch.randn(patches // 4, model.config.vision_config.out_hidden_size, generator=generator).to(device, DTYPE)
                levels = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
                step = qwen_visionzip_step_on(model.model, block, hidden, torch.tensor([0, patches]),
                                              (angles.cos(), angles.sin()), merged, grid,
                                              [torch.randn_like(merged) for _ in range(levels)])
            elif method in PRUNERS:  # the projected candidates of every view at the LLM's width, its embedding table
                _, views = family.views(model, pixels)
                candidates = _patches(model.config.vision_config) + (family.pruner_strategy == "full")
                projected = torch.randn(views.shape[0], candidates, text_config.hidden_size,
                                        generator=generator).to(device, DTYPE)
                if method == "cdpruner":
                    materialize(model.model.get_input_embeddings(), device)
                step = pruner_step_on(model.model, model.config.compression, projected, instruction_ids(device))
            elif method == "visionzip":
                tower, views = family.views(model, pixels)
                index = resolve_feature_layer(model.config.vision_feature_layer, len(tower.encoder.layers))
                layer = materialize(tower.encoder.layers[index], device)
                shape = (views.shape[0], _patches(model.config.vision_config) + int(family.vision_cls),
                         model.config.vision_config.hidden_size)
                layer_input, layer_output = (torch.randn(*shape, generator=generator).to(device, DTYPE) for _ in range(2))
                step = visionzip_step_on(layer, layer_input, layer_output, *family.visionzip_split(model.config.compression),
                                         cls=family.vision_cls)
            else:
                language_model = model.model.language_model
                layer = materialize(language_model.layers[model.config.compression["layers"][0]], device)
                with torch.device(device):
                    rotary_emb = type(language_model.rotary_emb)(config=text_config)
                hidden = torch.randn(tokens, text_config.hidden_size, generator=generator).to(device, DTYPE)
                step = sparsevlm_step_on(layer, rotary_emb, hidden, 5, visual, model.config.compression)
            with torch.inference_mode():
                row["method_step_peak_bytes"], _ = peak_bytes(step, device)
            row["memory_never_worse"] = row["method_step_peak_bytes"] < kv_bytes
            row["step_to_kv_ratio"] = row["method_step_peak_bytes"] / kv_bytes
        except Exception as error:  # noqa: BLE001 (recorded, the check goes on)
            row["errors"] = {"step": error_text(error)}
        rows.append(row)
        print(f"  {family.name:>11} {row['setting']:>16}: step peak "
              f"{row.get('method_step_peak_bytes', 0) / 2**20:9.2f} MiB vs uncompressed KV cache {kv_bytes / 2**20:8.1f} MiB"
              f"  {'OK (never worse)' if row.get('memory_never_worse') else 'WORSE / failed'}"
              + (f"  {row['errors']}" if row.get("errors") else ""), flush=True)
    return rows


def flops_of(config, family: Family, compression: dict, visual: int, text: int, lengths: list[int] | None) -> float:
    """Prefill FLOPs (benchmarks/flops.py) of one setting: `lengths` per decoder layer (SparseVLM), else all
    layers over `visual + text` tokens."""
    vision, text_config = config.vision_config, config.text_config
    lengths = lengths or [visual + text] * text_config.num_hidden_layers
    if family.vision_flops is not None:
        return family.vision_flops(config, compression) + sum(llm_layer_flops(text_config, n) for n in lengths)
    views, tokens_per_view, projected, extra = family.flop_layout(config, compression)
    # VisionZip's tower stops at its scoring layer (L-2 on CLIP: L-1 layers; OneVision's -1: all of them).
    tower_layers = (resolve_feature_layer(config.vision_feature_layer, vision.num_hidden_layers) + 1
                    if compression["method"] == "visionzip" else vision.num_hidden_layers)
    if compression["method"] in PRUNERS and projected is None:
        projected = views * tokens_per_view  # every candidate is projected, then K of them kept
    return prefill_flops(vision, text_config, views=views, tokens_per_view=tokens_per_view, tower_layers=tower_layers,
                         projected=visual if projected is None else projected, lengths=lengths, extra=extra)


def voco_flops(text_config, cached: int, question: int) -> float:
    """Answering from a VoCo cache: every decoder layer over the question, attending to `cached` + its own tokens
    (the image is not rerun: stage 1 ran once per image)."""
    return text_config.num_hidden_layers * llm_layer_flops(text_config, question, cached + question)


def real_shape_flops(family: Family, row: dict, dense_visual: int) -> tuple[float, float | None]:
    """(prefill FLOPs, SparseVLM's planned equal tokens) of the row at the published shapes and full depth, with
    the row's token counts (--tiny keeps the real counts); SparseVLM's schedule is the full-depth setting's."""
    config, _ = family_config(family, tiny=False)
    layers = config.text_config.num_hidden_layers
    if row["method"] == "voco":
        return voco_flops(config.text_config, row["cached_tokens"], row["question_tokens"]), None
    compression = next(c for m, b, c in settings(family, layers, dense_visual, False)
                       if m == row["method"] and b == row["budget"])
    config.compression = compression  # normalised on assignment
    lengths, equal_tokens = None, None
    if row["method"] == "sparsevlm":
        schedule = sparsevlm_schedule(config.compression, row["visual_tokens"], layers)
        lengths = [row["text_tokens"] + count for count in schedule.processed]
        equal_tokens = schedule.equal_tokens
    flops = flops_of(config, family, config.compression, row["visual_tokens"], row["text_tokens"], lengths)
    return flops, equal_tokens


def measure_setting(run: Run, method: str, budget: int | None, compression: dict) -> dict:
    model, family, device = run.model, run.family, run.device
    row = {"family": family.name, "method": method, "setting": f"{method} {budget}" if method != "none" else "uncompressed",
           "budget": budget, "attn_implementation": run.attn, "dtype": "bfloat16"}
    try:
        model.set_compression(compression)
    except ValueError as error:  # a method this family refuses (its config says so): skipped, not a failure
        row.update(skipped=f"unsupported by this family: {error_text(error)}", prefill_flops=None)
        return row
    row["compression"] = model.config.compression
    generator = torch.Generator().manual_seed(0)
    pixels = on_device(family.pixels(model.config, generator), device)
    if method == "cdpruner":
        # The instruction CDPruner ranks against: LLM-vocabulary ids, one row per image (the processor-free form
        # of what the Slim processor writes; relevance "llm_embeddings" embeds them with the LLM's table).
        pixels[family.relevance_key] = instruction_ids(device)
    with torch.inference_mode():
        visual = visual_count(family.vision(model, pixels))
    voco = method == "voco"
    ids, prefix_end = prompt_ids(family, model.config, visual, 1 if voco else 0, generator)
    ids = ids.to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels,
              **(family.extra_inputs(model.config, ids) if family.extra_inputs else {})}
    text = ids.shape[1] - visual
    row.update(visual_tokens=visual, text_tokens=text)

    def part(name: str, fn: Callable) -> None:
        try:
            with torch.inference_mode():
                fn()
        except Exception as error:  # noqa: BLE001 (a failing part is recorded, the run goes on)
            row.setdefault("errors", {})[name] = error_text(error)
            if "--traceback" in sys.argv:
                traceback.print_exc()
            if device == "cuda":  # e.g. after an out-of-memory error, give the next part its memory back
                gc.collect()
                torch.cuda.empty_cache()

    if voco:
        prefix = {key: value[:, :prefix_end] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
                  for key, value in inputs.items()}
        question = ids[:, prefix_end:]
        cache = {}

        def compress():
            row["vision_ms"], cache["cache"] = run.clock(lambda: model.voco_compress(**prefix), run.repeats)
            row["method_step_ms"] = row["vision_ms"]
            row["method_step_peak_bytes"], _ = peak_bytes(lambda: model.voco_compress(**prefix), device)
            row["cached_tokens"] = cache["cache"].num_voco_tokens

        part("voco_compress", compress)
        if "cache" not in cache:
            return row
        voco_cache = cache["cache"]
        row["visual_tokens"] = voco_cache.num_voco_tokens
        forward = lambda: model(input_ids=question, voco_cache=voco_cache, use_cache=True, logits_to_keep=1)  # noqa: E731
        generate = lambda **kw: model.generate(input_ids=question, voco_cache=voco_cache, **kw)  # noqa: E731
        row["question_tokens"] = row["text_tokens"] = question.shape[1]
        row["prefill_flops"] = voco_flops(model.config.text_config, voco_cache.num_voco_tokens, question.shape[1])
    else:
        forward = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
        generate = lambda **kw: model.generate(**inputs, **kw)  # noqa: E731

        def vision_part():
            row["vision_ms"], _ = run.clock(lambda: family.vision(model, pixels), run.repeats)

        part("vision", vision_part)

    def prefill_part():
        row["prefill_ms"], _ = run.clock(forward, run.repeats)
        row["peak_memory_bytes"], _ = peak_bytes(forward, device)

    part("prefill", prefill_part)
    if method == "sparsevlm" and model.sparsevlm_report is not None and "prefill" not in row.get("errors", {}):
        report = model.sparsevlm_report
        row["equal_tokens"] = report.equal_tokens[0]
        lengths = [text + count for count in report.processed_counts[0]]
    else:
        lengths = None
    if not voco:
        row["prefill_flops"] = flops_of(model.config, family, model.config.compression, visual, text, lengths)
    part("decode", lambda: measure_decoding(run, row, generate))

    if method in ("visionzip", "sparsevlm") + PRUNERS:
        def step_part():
            generic = {"visionzip": lambda run, ids, pixels: visionzip_step(run, pixels), "sparsevlm": sparsevlm_step,
                       "cdpruner": pruner_step, "divprune": pruner_step}
            step = {**generic, **(family.method_steps or {})}[method](run, ids, pixels)
            row["method_step_ms"], _ = run.clock(step, run.repeats)
            row["method_step_peak_bytes"], _ = peak_bytes(step, device)

        part("method_step", step_part)
    return row


def finish_rows(rows: list[dict]) -> None:
    """Ratios against the uncompressed row of the same family and attention implementation."""
    for row in rows:
        dense = next((r for r in rows if r["family"] == row["family"] and r["method"] == "none"
                      and r["attn_implementation"] == row["attn_implementation"]), None)
        ok = dense is not None
        row["speedup"] = dense["ttft_ms"] / row["ttft_ms"] if ok and row.get("ttft_ms") and dense.get("ttft_ms") else None
        row["prefill_speedup"] = (dense["prefill_ms"] / row["prefill_ms"]
                                  if ok and row.get("prefill_ms") and dense.get("prefill_ms") else None)
        row["flop_ideal_speedup"] = (dense["prefill_flops"] / row["prefill_flops"]
                                     if ok and row.get("prefill_flops") and dense.get("prefill_flops") else None)
        row["share_of_ideal"] = (row["speedup"] / row["flop_ideal_speedup"]
                                 if row["speedup"] and row["flop_ideal_speedup"] else None)
        # The same ratio at the published shapes and full depth (on a real-shape run it equals flop_ideal_speedup;
        # under --tiny it is what the GPU run will be compared against).
        try:
            family = FAMILIES[row["family"]]
            shrunk = row.get("shapes") == "tiny" and not family.tiny_real_counts
            if shrunk:
                row["real_shapes_note"] = "--tiny shrinks this family's token counts: no real-shape ratio from its rows"
            ideal, equal_tokens = (real_shape_flops(family, row, dense["visual_tokens"])
                                   if ok and row.get("prefill_flops") and not shrunk else (None, None))
            dense_ideal = real_shape_flops(family, dense, dense["visual_tokens"])[0] if ideal else None
            row["flop_ideal_speedup_real_shapes"] = dense_ideal / ideal if ideal else None
            if equal_tokens is not None:
                row["equal_tokens_real_shapes"] = equal_tokens
        except (KeyError, StopIteration, TypeError) as error:
            row["flop_ideal_speedup_real_shapes"] = None
            row.setdefault("errors", {})["real_shape_flops"] = error_text(error)
        for key in ("ttft_ms", "prefill_ms", "decode_tokens_per_s", "peak_memory_bytes", "method_step_peak_bytes",
                    "vision_ms", "method_step_ms"):
            row.setdefault(key, None)
        dense_peak = dense.get("peak_memory_bytes") if ok else None
        step_peak = row.get("method_step_peak_bytes")
        row["uncompressed_prefill_peak_bytes"] = dense_peak
        row["memory_never_worse"] = (step_peak <= dense_peak) if step_peak is not None and dense_peak else None


def run_family(family: Family, args, attn: str, deadline: float, save: Callable = lambda rows: None) -> list[dict]:
    device = args.device
    print(f"== {family.title} [{family.name}], {attn}, {'tiny' if args.tiny else 'real'} shapes", flush=True)
    started = time.perf_counter()
    try:
        model = build_model(family, device, args.tiny, attn)
        if device == "cuda":
            torch.cuda.synchronize()
        build_s = time.perf_counter() - started
        resident = torch.cuda.memory_allocated() if device == "cuda" else sum(
            p.numel() * p.element_size() for p in model.parameters())
        pixels = on_device(family.pixels(model.config, torch.Generator().manual_seed(0)), device)
        with torch.inference_mode():
            full_visual = visual_count(family.vision(model, pixels))
    except Exception as error:  # noqa: BLE001 (one family that cannot be built does not stop the others)
        if args.traceback:
            traceback.print_exc()
        print(f"  could not build: {error_text(error)}", flush=True)
        return [{"family": family.name, "method": method, "budget": None, "attn_implementation": attn,
                 "setting": method, "errors": {"build": error_text(error)}}
                for method in METHODS]
    # One static-cache length per family, so compiled decoding is not re-traced per setting.
    run = Run(family, model, device, attn, args.repeats, args.new_tokens,
              max_cache_len=full_visual + PROMPT_TOKENS + family.groups + args.new_tokens + 8,
              clock=Clock(device, warmup=0 if args.tiny else 1),  # --tiny: no timing meaning, no warm-up
              cpu_compile=args.cpu_compile)
    rows = []
    for method, budget, compression in settings(family, model.config.text_config.num_hidden_layers, full_visual, args.quick,
                                                args.tiny):
        if time.perf_counter() > deadline:
            rows.append({"family": family.name, "method": method, "budget": budget, "attn_implementation": attn,
                         "setting": f"{method} {budget}", "skipped": "time budget spent", "prefill_flops": None})
            continue
        try:
            row = measure_setting(run, method, budget, compression)
        except Exception as error:  # noqa: BLE001 (never crash the run for one setting)
            row = {"family": family.name, "method": method, "budget": budget, "attn_implementation": attn,
                   "setting": f"{method} {budget}", "errors": {"setting": error_text(error)}}
        row.update(model=family.title, hub_id=family_config(family, args.tiny)[1], shapes="tiny" if args.tiny else "real",
                   build_s=build_s, resident_bytes=resident)
        rows.append(row)
        print(describe(row), flush=True)
        save(rows)
    del run, model
    gc.collect()
    if device == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return rows


def describe(row: dict) -> str:
    def ms(key):
        value = row.get(key)
        return f"{value:8.1f}" if value is not None else "       -"

    tps = row.get("decode_tokens_per_s")
    errors = "; ".join(f"{k}: {v}" for k, v in (row.get("errors") or {}).items())
    return (f"  {row['setting']:>16} visual {row.get('visual_tokens', '-')!s:>5}  vision {ms('vision_ms')} ms  "
            f"prefill {ms('prefill_ms')} ms  ttft {ms('ttft_ms')} ms  decode "
            f"{(f'{tps:7.1f}' if tps else '      -')} tok/s [{row.get('decode_mode', '-')}]"
            + (f"  skipped: {row['skipped']}" if row.get("skipped") else "") + (f"\n      errors: {errors}" if errors else ""))


def print_summary(rows: list[dict], tiny: bool) -> None:
    print("\nTTFT speed-up vs uncompressed (measured / FLOP-ideal), and the 'memory never worse' check"
          + (" (--tiny: 32-wide models, where O(tokens²) bookkeeping outweighs the activations; a smoke test of the"
             " code path, not the claim, which is at real shapes):" if tiny else ":"))
    print(f"  {'family':>11} {'attn':>17} {'setting':>16} {'speedup':>8} {'ideal':>7} {'share':>6} {'ideal@7B':>9}  "
          f"{'step peak':>11} {'dense prefill peak':>19}  check")
    for row in rows:
        if row["method"] == "none":
            continue

        def num(key, fmt):
            value = row.get(key)
            return format(value, fmt) if value is not None else "-"

        def mib(key):
            value = row.get(key)
            return f"{value / 2**20:.2f} MiB" if value is not None else "-"

        check = ("skipped: " + row["skipped"][:60] if row.get("skipped")
                 else {True: "OK (never worse)", False: "WORSE", None: "n/a"}[row.get("memory_never_worse")])
        print(f"  {row['family']:>11} {row['attn_implementation']:>17} {row['setting']:>16} {num('speedup', '.2f'):>8} "
              f"{num('flop_ideal_speedup', '.2f'):>7} {num('share_of_ideal', '.0%'):>6} "
              f"{num('flop_ideal_speedup_real_shapes', '.2f'):>9}  {mib('method_step_peak_bytes'):>11} "
              f"{mib('uncompressed_prefill_peak_bytes'):>19}  {check}")


def plot(rows: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(row["family"] for row in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 4), squeeze=False)
    for ax, name in zip(axes[0], families):
        attn = next(row["attn_implementation"] for row in rows if row["family"] == name)
        chosen = [row for row in rows if row["family"] == name and row["attn_implementation"] == attn
                  and row["method"] != "none" and not row.get("skipped")]
        labels = [row["setting"] for row in chosen]
        xs = range(len(chosen))
        nan = float("nan")  # a missing value draws no bar
        ax.bar([x - 0.2 for x in xs], [row.get("speedup") or nan for row in chosen], 0.4, label="TTFT speed-up (measured)")
        ax.bar([x + 0.2 for x in xs], [row.get("flop_ideal_speedup") or nan for row in chosen], 0.4,
               label="FLOP-ideal", alpha=0.6)
        ax.set_yscale("log")  # VoCo answering from K cached tokens is orders of magnitude above the rest
        ax.axhline(1, color="gray", linestyle=":")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{FAMILIES[name].title if name in FAMILIES else name}\n{attn}, bf16", fontsize=9)
        ax.set_ylabel("x vs uncompressed")
        ax.legend(fontsize=7)
    fig.suptitle(f"SlimVLM, random weights at {'tiny' if rows and rows[0].get('shapes') == 'tiny' else 'real 7B'} shapes, "
                 f"{device_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (real token counts): a smoke test in seconds")
    parser.add_argument("--quick", action="store_true", help="sdpa only, the smallest budget per method, fewer repeats")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3, quick 2, tiny 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32, quick 16, tiny 4)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="skip remaining rows once spent (default: 480, quick 120; none for --tiny)")
    parser.add_argument("--cpu-compile", action="store_true",
                        help="on CPU, try fullgraph graph capture (torch.compile, eager backend) before eager decoding")
    parser.add_argument("--real-shape-steps", action="store_true",
                        help="also (CPU: instead of a full real-shape run) the memory check of every method step at the "
                             "published widths, against the uncompressed KV cache, without a 7B model in memory")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of every recorded error")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False (use --device cpu --tiny)")
    args.repeats = args.repeats or (1 if args.tiny else 2 if args.quick else 3)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 16 if args.quick else 32)
    if args.time_budget_s is None and not args.tiny:
        args.time_budget_s = 120.0 if args.quick else 480.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    deadline = started + args.time_budget_s if args.time_budget_s else float("inf")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], complete: bool) -> dict:
        result = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                  "shapes": "tiny" if args.tiny else "real", "quick": args.quick, "repeats": args.repeats,
                  "new_tokens": args.new_tokens, "prompt_text_tokens": PROMPT_TOKENS, "dtype": "bfloat16",
                  "wall_s": time.perf_counter() - started, "complete": complete, "rows": rows}
        args.output.write_text(json.dumps(result, indent=2, default=str))
        return result

    rows: list[dict] = []

    def save_partial(family_rows: list[dict]) -> None:
        """After every row: the raw rows so far (ratios come at the end), so that a run stopped from outside still
        leaves what it measured."""
        write(rows + family_rows, complete=False)

    step_rows = []
    if args.real_shape_steps:
        print("== 'memory never worse' at the published widths: each method step alone vs the uncompressed KV cache")
        for name in args.families:
            step_rows += real_shape_step_check(FAMILIES[name], args.device, args.quick)
    if args.tiny or args.device == "cuda" or not args.real_shape_steps:
        for attn in attention_implementations(args.device, args.quick):  # every family under sdpa first
            for name in args.families:
                rows += run_family(FAMILIES[name], args, attn, deadline, save_partial)
    finish_rows(rows)
    if rows:
        print_summary(rows, args.tiny)
    result = write(rows, complete=True)
    if step_rows:
        result["real_shape_step_check"] = step_rows
        args.output.write_text(json.dumps(result, indent=2, default=str))
    if not rows:
        print(f"wrote {args.output} ({result['wall_s']:.0f} s)")
        return result
    plot(rows, args.output.with_suffix(".png"), device_name)
    print(f"wrote {args.output} and {args.output.with_suffix('.png').name} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
