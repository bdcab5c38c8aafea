"""Qwen2.5-VL with visual-token compression built in (specs/modern_families.md).

`SlimQwen2_5_VLForConditionalGeneration` is `Qwen2_5_VLForConditionalGeneration` with one extra config field,
`compression`. Shipped with checkpoints: imports only torch, transformers and flat siblings. This module says
where a Qwen image's pixels, views and positions go; the VisionZip math is `visionzip.py`'s.

VisionZip (the official Qwen2.5-VL semantics, spec §2.1): a view is one image or one temporal step of a video;
a merge unit (2 x 2 patches) is scored by the attention its 4 patches receive in the last vision block (chunked,
never N x N), the window order undone; dominant and contextual units are chosen per view and merged on the
merger's output rows. Kept tokens keep their original 3-D M-RoPE positions, gaps included.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers import modeling_outputs
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compat import call_with_cache, can_return_tuple
from .configuration_qwen_vl import SlimQwen2_5_VLConfig, qwen_token_count
from .modeling_slimvlm import SlimGenerationMixin, SlimModelMixin, slim_forward
from .visionzip import segmented_attention_received, select_units, unit_scores_and_keys, visionzip_counts
from .voco import positions_from_padding

# What the stock Qwen-VL base forward returns: with the encoder outputs from transformers 5.24, plain before.
QWEN_MODEL_OUTPUT = getattr(modeling_outputs, "MultimodalBaseModelOutputWithPast", modeling_outputs.BaseModelOutputWithPast)

# bitsandbytes skip list (spec M12): the tower and its merger live in `model.visual`.
QWEN_QUANTIZATION_SKIP_MODULES = ["model.visual", "lm_head"]


@dataclass
class SlimQwenVisionOutput(BaseModelOutputWithPooling):
    """`get_image_features` / `get_video_features` output under VisionZip.

    pooler_output: one [K_i, D] tensor per image (video), the kept merged tokens in ascending unit order.
    visionzip_keep: one [K_i] tensor per image (video): the kept unit indices into the item's dense token order
        (t-major raster over (t, gh/2, gw/2)), ascending; they select the tokens' M-RoPE positions.
    visionzip_grids: [items, 3] the grids (`image_grid_thw` / `video_grid_thw`; `generate()` pops those).
    deepstack_features: Qwen3-VL only: per DeepStack level, one [K_i, D] tensor per item (same keep and merge).
    """

    visionzip_keep: tuple[torch.Tensor, ...] | None = None
    visionzip_grids: torch.Tensor | None = None
    deepstack_features: tuple | None = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vision_query_key(block, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen vision block's q and k after its 2-D RoPE, [N, H, Dh], from its own norm1 and qkv (any backend).

    Same numerics as the stock vision attention: the rotation in fp32, then back to the compute dtype.
    """
    attention = block.attn
    length = hidden_states.shape[0]
    qkv = attention.qkv(block.norm1(hidden_states)).reshape(length, 3, attention.num_heads, -1)
    query, key = qkv[:, 0], qkv[:, 1]
    cos, sin = (table.unsqueeze(-2).float() for table in position_embeddings)
    rotated = [((x.float() * cos) + (rotate_half(x.float()) * sin)).to(x.dtype) for x in (query, key)]
    return rotated[0], rotated[1]


class ScoringHook:
    """Forward pre-hook on the scoring block: patch scores ("attention received", spec §5) and keys, per run.

    Reads the block's inputs (`hidden_states`, `cu_seqlens`, `position_embeddings`) under no_grad; a gradient
    checkpoint recompute of the same block is ignored (the first call of a run wins).
    """

    def __init__(self, block):
        self.block = block
        self.received = self.keys = None

    def __call__(self, module, args, kwargs):
        if self.received is not None:
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            query, key = vision_query_key(module, hidden_states, kwargs["position_embeddings"])
            self.received = segmented_attention_received(query, key, kwargs["cu_seqlens"])
            self.keys = key
        return None

    def run(self, tower_call):
        handle = self.block.register_forward_pre_hook(self, with_kwargs=True)
        try:
            return tower_call()
        finally:
            handle.remove()


def window_unit_order(grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int) -> torch.Tensor:
    """Qwen2.5-VL's window permutation of merge units (`hidden = units[order]`), as the stock tower builds it."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=spatial_merge_size, window_size=window_size,
                                   patch_size=patch_size)[0]


class QwenVisionZipMixin:
    """VisionZip, placeholders and M-RoPE positions for the Qwen-VL base models (shared by Qwen2.5-VL and Qwen3-VL)."""

    # Qwen3-VL writes one placeholder group per temporal step of a video (timestamps between them).
    video_group_per_step = False

    def _visionzip_counts(self, units: int) -> tuple[int, int]:
        compression = self.config.compression
        return visionzip_counts(units, compression["dominant_ratio"], compression["contextual_ratio"])

    def _unit_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """The tower's unit permutation (None: raster order). Qwen2.5-VL: its window index."""
        vision = self.config.vision_config
        return window_unit_order(grid_thw, vision.spatial_merge_size, vision.window_size, vision.patch_size)

    def _run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        """The stock tower on all items at once; returns (tower output, merged rows [Σ n, D], DeepStack rows)."""
        output = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, **kwargs)
        return output, output.pooler_output, None

    def _visionzip_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> SlimQwenVisionOutput:
        """Run the tower once with the scoring hook, then select per view and merge on the merged rows."""
        hook = ScoringHook(self.visual.blocks[-1])
        output, merged, deepstack = hook.run(lambda: self._run_tower(pixel_values, grid_thw, **kwargs))
        merge = self.visual.spatial_merge_size**2
        scores, keys = unit_scores_and_keys(hook.received, hook.keys, self._unit_order(grid_thw), merge)
        features, deep, keeps = [], [[] for _ in deepstack or ()], []
        start = 0
        for steps, height, width in grid_thw.tolist():
            units = height * width // merge
            kept, kept_deep, keep = [], [[] for _ in deepstack or ()], []
            for step in range(steps):
                view = slice(start + step * units, start + (step + 1) * units)
                selection = select_units(scores[view], keys[view], *self._visionzip_counts(units))
                kept.append(selection.apply(merged[view]))
                for level, rows in enumerate(deepstack or ()):
                    kept_deep[level].append(selection.apply(rows[view]))
                keep.append(selection.keep.to(merged.device) + step * units)
            features.append(torch.cat(kept))
            for level in range(len(deep)):
                deep[level].append(torch.cat(kept_deep[level]))
            keeps.append(torch.cat(keep))
            start += steps * units
        return SlimQwenVisionOutput(
            last_hidden_state=output.last_hidden_state,
            pooler_output=tuple(features),
            hidden_states=getattr(output, "hidden_states", None),
            attentions=getattr(output, "attentions", None),
            visionzip_keep=tuple(keeps),
            visionzip_grids=grid_thw,
            deepstack_features=tuple(tuple(level) for level in deep) if deepstack is not None else None,
        )

    def visionzip_token_count(self, grid_thw) -> int:
        """Tokens one image or video of grid (t, gh, gw) becomes under the current compression (the processor's count)."""
        return qwen_token_count(self.config.compression, grid_thw, self.config.vision_config.spatial_merge_size)

    # ---- M-RoPE positions of compressed groups (spec §3 "Positions") ----

    def _group_positions(self, start: int, grid_thw, time_interval, keep: torch.Tensor | None, length: int,
                         device) -> torch.Tensor:
        """[3, length] positions of one compressed vision group: the stock dense ids at `keep`, or before encoding
        (keep unknown) the first `length` of them; a group of another length than the compressed count raises."""
        merge = self.config.vision_config.spatial_merge_size
        dense = self.get_vision_position_ids(start, grid_thw, 1, merge, time_interval, device=device)
        expected = self.visionzip_token_count(grid_thw)
        if length != expected:
            raise ValueError(
                f"a vision group of grid {[int(x) for x in grid_thw]} has {length} placeholder tokens, but compression "
                f"{self.config.compression} makes it {expected}; build the processor with the model's compression "
                "(SlimQwen2_5_VLProcessor.from_pretrained(path, compression=model.config.compression))"
            )
        if keep is not None:
            return dense[:, keep.to(device)]
        return dense[:, :length]

    def _compressed_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                               second_per_grid_ts=None, attention_mask=None, visionzip_keep=None):
        """`get_rope_index` for compressed groups: text as stock; a vision group gets its kept tokens' stock ids and
        advances the position by max(gh, gw)/2 as stock. Returns (position_ids [3, B, L], rope_deltas [B, 1])."""
        import itertools

        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1)
        visionzip_keep = visionzip_keep or {}
        positions = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
        video_grids = list(video_grid_thw) if video_grid_thw is not None else []
        video_keeps = list(visionzip_keep.get("video") or [])
        if self.video_group_per_step:  # one group (1, gh, gw) per step; its kept units re-based to the step
            steps = [(int(g[0]), int(g[1]) * int(g[2]) // merge**2) for g in video_grids]
            video_keeps = [k[(k >= t * n) & (k < (t + 1) * n)] - t * n
                           for k, (steps_, n) in zip(video_keeps, steps) for t in range(steps_)]
            video_grids = [torch.tensor([1, g[1], g[2]]) for g in video_grids for _ in range(int(g[0]))]
        grids = {1: iter(image_grid_thw if image_grid_thw is not None else ()), 2: iter(video_grids)}
        keeps = {1: iter(visionzip_keep.get("image") or ()), 2: iter(video_keeps)}
        seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else [1] * input_ids.shape[1])
        deltas = []
        for b in range(input_ids.shape[0]):
            types = mm_token_type_ids[b]
            real = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(types, dtype=torch.bool)
            types = types[real]
            current, pieces = 0, []
            for modality, group in itertools.groupby(types.tolist()):
                length = len(list(group))
                if modality == 0:
                    pieces.append(torch.arange(length, device=input_ids.device).view(1, -1).expand(3, -1) + current)
                    current += length
                    continue
                try:
                    grid = next(grids[modality])
                except StopIteration:
                    raise ValueError(f"input has more {'image' if modality == 1 else 'video'} groups than grids") from None
                interval = tokens_per_second * next(seconds) if modality == 2 else 1
                pieces.append(self._group_positions(current, grid, interval, next(keeps[modality], None), length,
                                                    input_ids.device))
                current += max(int(grid[1]), int(grid[2])) // merge
            row = torch.cat(pieces, dim=1) if pieces else positions.new_zeros(3, 0)
            positions[:, b, real] = row.to(positions.dtype)
            deltas.append((row.max() + 1 - row.shape[1]) if row.numel() else torch.tensor(0))
        return positions, torch.stack([torch.as_tensor(d) for d in deltas]).to(input_ids.device).view(-1, 1)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs):
        """Merged image features, one [K_i, D] tensor per image in `pooler_output`; compressed under VisionZip
        (then also `visionzip_keep` and `visionzip_grids`, see `SlimQwenVisionOutput`)."""
        if self.config.compression["method"] != "visionzip":
            return super().get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)
        return self._visionzip_features(pixel_values, image_grid_thw, **kwargs)

    @can_return_tuple
    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs):
        """Merged video features, one tensor per video; under VisionZip every temporal step is a view."""
        if self.config.compression["method"] != "visionzip":
            return super().get_video_features(pixel_values_videos, video_grid_thw, return_dict=True, **kwargs)
        return self._visionzip_features(pixel_values_videos, video_grid_thw, **kwargs)

    def _slim_forward(self, cache=None, **inputs):
        if self.config.compression["method"] == "visionzip":
            return self._forward_visionzip(cache=cache, **inputs)
        return super()._slim_forward(cache=cache, **inputs)

    def _forward_visionzip(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                           pixel_values=None, pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                           mm_token_type_ids=None, second_per_grid_ts=None, mm_encoder_outputs=None,
                           padding_mask=None, **kwargs):
        """The stock forward on compressed features, with the kept tokens' positions recomputed at prefill.

        Every forward that consumes vision features recomputes rows 1-3 of the M-RoPE positions from the kept
        indices (generate() builds them before it encodes the images), keeps a supplied text row 0, and sets
        `rope_deltas`; decoding steps (no vision input) run as stock. The positions need the [B, L] padding mask:
        `attention_mask` when it is one, else `padding_mask` (generate() with a static cache builds the 4-D masks
        before the forward; `prepare_inputs_for_generation` then passes the 2-D one as `padding_mask`).
        """
        if (pixel_values is not None or pixel_values_videos is not None) and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time")
        encoded = dict(mm_encoder_outputs or {})
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        media = {name: output for name, output in encoded.items() if output is not None}
        if media:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    "VisionZip on Qwen-VL needs the whole prompt with its images in one prefill: got vision features with "
                    f"a non-empty cache ({cache.get_seq_length()} tokens). Chunked prefill (prefill_chunk_size) and "
                    "adding images to a continued conversation are not supported; run the prompt in one forward"
                )
            if input_ids is None or mm_token_type_ids is None:
                raise ValueError(
                    "VisionZip on Qwen-VL recomputes the kept tokens' M-RoPE positions from input_ids and "
                    "mm_token_type_ids (the processor returns both); got "
                    f"input_ids={'None' if input_ids is None else 'given'}, "
                    f"mm_token_type_ids={'None' if mm_token_type_ids is None else 'given'}"
                )
            for name, output in media.items():
                if getattr(output, "visionzip_keep", None) is None:
                    raise ValueError(f"{name} features were not encoded under VisionZip (no visionzip_keep); encode them "
                                     "with this model's get_image_features / get_video_features")
            grids = {name: output.visionzip_grids for name, output in media.items()}
            rows, deltas = self._compressed_rope_index(
                input_ids, mm_token_type_ids, grids.get("image"), grids.get("video"), second_per_grid_ts,
                self._padding_mask(attention_mask, padding_mask, input_ids),
                {name: output.visionzip_keep for name, output in media.items()})
            if position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] == 4:
                rows = torch.cat([position_ids[:1], rows.to(position_ids.device)], dim=0)
            position_ids = rows
            self.rope_deltas = deltas
        if second_per_grid_ts is not None:  # a Qwen2.5-VL argument (Qwen3-VL has none)
            kwargs["second_per_grid_ts"] = second_per_grid_ts
        return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                   mm_token_type_ids=mm_token_type_ids, mm_encoder_outputs=encoded or None, **kwargs)

    @staticmethod
    def _padding_mask(attention_mask, padding_mask, input_ids):
        """The [B, L] padding mask of a prefill: `attention_mask` if it is one, else `padding_mask`; None = no padding."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            return attention_mask
        if padding_mask is not None:
            if padding_mask.shape != input_ids.shape:
                raise ValueError(f"padding_mask must be [batch, length] = {list(input_ids.shape)} like input_ids; got "
                                 f"{list(padding_mask.shape)}")
            return padding_mask
        if attention_mask is None:
            return None
        raise ValueError(
            "VisionZip on Qwen-VL recomputes the kept tokens' M-RoPE positions from the [batch, length] padding mask; "
            f"got attention_mask as {type(attention_mask).__name__}"
            f"{' of shape ' + str(list(attention_mask.shape)) if isinstance(attention_mask, torch.Tensor) else ''}: "
            "pass the 2-D mask as padding_mask= as well")

    def _qwen_merged_embeddings(self, input_ids, inputs_embeds, pixel_values, pixel_values_videos, image_grid_thw,
                                video_grid_thw, mm_encoder_outputs, **kwargs):
        """Decoder input with the image and video features scattered in, as the stock forward builds it.

        Returns (inputs_embeds [B, L, C], visual_mask [B, L] at every image/video placeholder, the encoder
        outputs as `model_output` fields)."""
        inputs_embeds, encoded = self._embeddings_and_encoded(input_ids, inputs_embeds, pixel_values, pixel_values_videos,
                                                              mm_encoder_outputs)
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True, **kwargs)
        visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        masks, deepstack = {}, None
        for index, modality in enumerate(("image", "video")):
            if encoded.get(modality) is None:
                continue
            features = torch.cat(list(encoded[modality].pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                             **{f"{modality}_features": features})[index]
            masks[modality] = mask[..., 0]
            visual_mask = visual_mask | mask[..., 0]
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)
        levels = {modality: getattr(encoded[modality], "deepstack_features", None) for modality in masks}
        if any(level is not None for level in levels.values()):  # Qwen3-VL: rows in placeholder order, as stock
            deepstack = []
            for per_modality in zip(*(levels[modality] for modality in masks)):
                joint = inputs_embeds.new_zeros(int(visual_mask.sum()), inputs_embeds.shape[-1])
                for modality, rows in zip(masks, per_modality):
                    joint[masks[modality][visual_mask]] = torch.cat(list(rows)).to(joint.dtype)
                deepstack.append(joint)
        fields = {"image_outputs": encoded.get("image"), "video_outputs": encoded.get("video")}
        return inputs_embeds, visual_mask, fields, deepstack

    # ---- VoCo-LLaMA (spec §6.2): the shared mask rule and cache with M-RoPE positions ----

    def _mrope_positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw,
                         second_per_grid_ts):
        """[4, B, L] = [text row (cumsum); stock 3-D ids] of a prompt; <voco> tokens are text-typed."""
        if mm_token_type_ids is None:
            raise ValueError("VoCo on Qwen-VL needs mm_token_type_ids (the processor returns them) for the 3-D positions")
        rows, deltas = self.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                           video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                           attention_mask=attention_mask)
        self.rope_deltas = deltas
        text = positions_from_padding(attention_mask, input_ids.shape[1]) if attention_mask is not None else \
            torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return torch.cat([text[None].to(rows.device), rows])

    def _voco_prefix_positions(self, input_ids, attention_mask, positions, kwargs: dict):
        kwargs = dict(kwargs)
        types = kwargs.pop("mm_token_type_ids", None)
        types = types[:, : input_ids.shape[1]] if types is not None else None
        full = self._mrope_positions(input_ids, attention_mask, types, kwargs.get("image_grid_thw"),
                                     kwargs.get("video_grid_thw"), kwargs.get("second_per_grid_ts"))
        kwargs["mm_token_type_ids"] = types
        return full, full[1], kwargs

    def _forward_voco(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                      voco_cache=None, voco_bounds=None, voco_token_mask=None, mm_token_type_ids=None,
                      image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, **kwargs):
        """The shared VoCo forward with the prompt's M-RoPE positions (computed here for a full-row forward
        without a cache when none are given; text-only continuations use the given/cumsum positions)."""
        media = dict(mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
        if second_per_grid_ts is not None:
            media["second_per_grid_ts"] = second_per_grid_ts
        empty = cache is None or cache.get_seq_length() == 0
        if position_ids is None and voco_cache is None and empty and input_ids is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            position_ids = self._mrope_positions(input_ids, mask, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                                 second_per_grid_ts)
        return super()._forward_voco(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     cache=cache, inputs_embeds=inputs_embeds, voco_cache=voco_cache,
                                     voco_bounds=voco_bounds, voco_token_mask=voco_token_mask, **media, **kwargs)

    def _forward_sparsevlm(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                           inputs_embeds=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                           image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None,
                           mm_encoder_outputs=None, sparsevlm_plan=None, **kwargs):
        """The stock forward with SparseVLM inside the language model (the shared wiring, with M-RoPE positions:
        survivors keep their original (t, h, w), spec §6.1). The visual span is each sample's one image or video."""
        media = dict(pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
                     video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
                     mm_encoder_outputs=mm_encoder_outputs)
        if second_per_grid_ts is not None:
            media["second_per_grid_ts"] = second_per_grid_ts
        if self.training:
            return self._stock_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **media, **kwargs)
        decoding = self._sparsevlm_checks(cache, kwargs)
        embeds, visual_mask, encoded, deepstack = self._qwen_merged_embeddings(
            input_ids, inputs_embeds, pixel_values, pixel_values_videos, image_grid_thw, video_grid_thw,
            mm_encoder_outputs)
        if position_ids is None:
            timing = {"second_per_grid_ts": second_per_grid_ts} if second_per_grid_ts is not None else {}
            position_ids = call_with_cache(
                self.compute_3d_position_ids, input_ids=input_ids, image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw, inputs_embeds=embeds, attention_mask=attention_mask,
                cache=cache if decoding else None, mm_token_type_ids=mm_token_type_ids, **timing)
        fields = self.output_class.__dataclass_fields__
        encoded = {name: value for name, value in encoded.items() if name in fields}  # transformers < 5.24: none
        return self._sparsevlm_language_model(embeds, visual_mask, encoded, attention_mask, position_ids, cache,
                                              decoding, use_cache, sparsevlm_plan, visual_injections=deepstack,
                                              **kwargs)


class SlimQwen2_5_VLModel(QwenVisionZipMixin, SlimModelMixin, Qwen2_5_VLModel):
    """`Qwen2_5_VLModel` whose `get_image_features` / `get_video_features` apply VisionZip (so `generate()`'s
    pre-encoding does too) and whose prefill recomputes the kept tokens' M-RoPE positions."""

    config: SlimQwen2_5_VLConfig
    config_class = SlimQwen2_5_VLConfig
    output_class = QWEN_MODEL_OUTPUT
    forward = slim_forward(Qwen2_5_VLModel)

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, visionzip_keep=None, **kwargs):
        """Stock `get_rope_index`; under VisionZip for compressed groups (`visionzip_keep`: {"image": ..., "video": ...}
        per item, else the first K ids of each group as placeholders until the prefill recomputes them)."""
        if self.config.compression["method"] != "visionzip":
            return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                          video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                          attention_mask=attention_mask, **kwargs)
        return self._compressed_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                           second_per_grid_ts, attention_mask, visionzip_keep)


class QwenGenerationMixin:
    """generate() checks, expansion and loading shared by the Qwen-VL families."""

    def image_tokens_summary(self) -> str:
        """The visual tokens per image, in words (model cards)."""
        compression = self.config.compression
        if compression["method"] == "visionzip":
            return (f"{compression['dominant_ratio']:g} + {compression['contextual_ratio']:g} of each image's "
                    "merged tokens (VisionZip)")
        return "each image's merged tokens (gh·gw/4)"

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`; under VisionZip a chunked prefill raises (the kept tokens' positions are
        recomputed from the whole prompt in one prefill)."""
        if self.config.compression["method"] == "visionzip":
            chunk = kwargs.get("prefill_chunk_size")
            generation_config = kwargs.get("generation_config") or self.generation_config
            chunk = chunk if chunk is not None else getattr(generation_config, "prefill_chunk_size", None)
            if chunk is not None:
                raise ValueError(
                    f"prefill_chunk_size={chunk} is not supported under VisionZip on Qwen-VL: the kept tokens' M-RoPE "
                    "positions are recomputed from the whole prompt in one prefill; pass prefill_chunk_size=None"
                )
        if kwargs.get("voco_cache") is not None:
            self.model.rope_deltas = None  # stage 2 continues from the cache's positions, never stage 1's δ (§6.2)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, attention_mask=None, **kwargs):
        """The shared inputs; under VisionZip a prefill whose mask generate() turned into 4-D masks (a static
        cache) also gets the 2-D padding mask as `padding_mask`, from which the kept tokens' positions are computed."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask, **kwargs)
        step_mask = model_inputs.get("attention_mask")
        step_ids = model_inputs.get("input_ids")
        if (
            self.config.compression["method"] == "visionzip"
            and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and not (isinstance(step_mask, torch.Tensor) and step_mask.dim() == 2)
            and step_ids is not None and step_ids.shape == attention_mask.shape
        ):
            model_inputs["padding_mask"] = attention_mask
        return model_inputs

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        """The stock expansion (beam search, num_return_sequences) of the pre-encoded features, plus our
        `visionzip_keep` / `visionzip_grids` in the same order (each sample's items repeated as a group)."""
        orders = {}
        for modality in ("image", "video"):
            output = mm_encoder_output.get(modality)
            if expand_size > 1 and getattr(output, "visionzip_keep", None) is not None and input_ids is not None:
                in_text = set(accumulate((input_ids == getattr(self.config, f"{modality}_token_id")).sum(-1).tolist()))
                in_vision = list(accumulate(len(rows) for rows in output.pooler_output))
                offsets = [0] + [i + 1 for i, count in enumerate(in_vision) if count in in_text]
                orders[modality] = [i for start, end in zip(offsets[:-1], offsets[1:])
                                    for i in list(range(start, end)) * expand_size]
        expanded = super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size=expand_size,
                                                      inputs_embeds=inputs_embeds)
        for modality, order in orders.items():
            output = expanded[modality]
            output.visionzip_keep = tuple(output.visionzip_keep[i] for i in order)
            output.visionzip_grids = output.visionzip_grids[torch.tensor(order, device=output.visionzip_grids.device)]
        return expanded

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As the other families; under bitsandbytes the default skip list is `model.visual` and `lm_head`."""
        quantization_config = kwargs.get("quantization_config")
        if isinstance(quantization_config, dict):
            quantization_config.setdefault("llm_int8_skip_modules", list(QWEN_QUANTIZATION_SKIP_MODULES))
        elif quantization_config is not None and getattr(quantization_config, "llm_int8_skip_modules", "absent") is None:
            quantization_config.llm_int8_skip_modules = list(QWEN_QUANTIZATION_SKIP_MODULES)
        return super().from_pretrained(*args, **kwargs)


class SlimQwen2_5_VLForConditionalGeneration(QwenGenerationMixin, SlimGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco", ...}).

    Loads stock Qwen2.5-VL checkpoints (current and legacy `visual.*` / `model.*` weight layouts);
    `{"method": "none"}` is the stock model.
    """

    config: SlimQwen2_5_VLConfig
    config_class = SlimQwen2_5_VLConfig
    base_model_class = SlimQwen2_5_VLModel


def register_stock_weight_names(slim_class, stock_class) -> None:
    """Our classes read and write the checkpoint layouts the stock class does (current and legacy keys)."""
    mapping = get_checkpoint_conversion_mapping(stock_class.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(slim_class.__name__, mapping, overwrite=True)


register_stock_weight_names(SlimQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
register_stock_weight_names(SlimQwen2_5_VLModel, Qwen2_5_VLModel)

SlimQwen2_5_VLConfig.register_for_auto_class()
SlimQwen2_5_VLModel.register_for_auto_class("AutoModel")
SlimQwen2_5_VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimQwen2_5_VLModel", "SlimQwen2_5_VLForConditionalGeneration", "SlimQwenVisionOutput",
           "QWEN_QUANTIZATION_SKIP_MODULES"]
