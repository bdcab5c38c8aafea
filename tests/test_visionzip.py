"""VisionZip (specs/visionzip.md): fp32 reference equality (A2), semantics (A3), errors (A1), isolation (A10),
training (A13).

The reference below never calls slimvlm: it runs a stock eager `CLIPVisionModel` with the same weights,
reads the full attention maps, the hidden states and the keys (a k_proj hook at layer L-2), and applies
§3 with explicit Python loops.
"""

from __future__ import annotations

import pytest
import torch
from builders import IMAGE_TOKEN_ID, make_processor, random_images, tiny_llava_config
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration, LlavaModel, SiglipVisionConfig
from transformers.models.clip import modeling_clip

from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration, SlimLlavaProcessor
from slimvlm.visionzip import cls_attention_and_keys, visionzip_select


def slim_model(compression=None, seed=0, attn_implementation=None, **config_kwargs) -> SlimLlavaForConditionalGeneration:
    config = SlimLlavaConfig.from_dict(tiny_llava_config(**config_kwargs).to_dict(), compression=compression)
    if attn_implementation is not None:
        config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return SlimLlavaForConditionalGeneration(config).eval()


def visionzip(dominant, contextual):
    return {"method": "visionzip", "dominant": dominant, "contextual": contextual}


# --- the independent reference ----------------------------------------------------------------------


def eager_clip_like(model: SlimLlavaForConditionalGeneration) -> CLIPVisionModel:
    """A stock CLIPVisionModel on eager attention with the Slim model's tower weights."""
    config = CLIPVisionConfig(**model.config.vision_config.to_dict())
    config._attn_implementation = "eager"
    tower = CLIPVisionModel(config).eval()
    missing, unexpected = tower.load_state_dict(model.model.vision_tower.state_dict(), strict=True)
    assert not missing and not unexpected
    return tower


def reference_visionzip(tower: CLIPVisionModel, pixel_values: torch.Tensor, d: int, c: int):
    """specs/visionzip.md §2-3, literally. Returns per view: (tokens [d+c, C], dominant set, targets, assignment)."""
    layers = tower.config.num_hidden_layers
    star = layers - 2
    heads = tower.config.num_attention_heads
    captured = {}
    layer = tower.encoder.layers[star]
    hook = layer.self_attn.k_proj.register_forward_hook(lambda module, args, output: captured.setdefault("k", output))
    try:
        with torch.no_grad():
            out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    assert out.attentions[star] is not None and out.attentions[star].shape[-1] == out.attentions[star].shape[-2]
    X_all = out.hidden_states[star + 1]  # output of layer L-2, no post-layernorm
    attention = out.attentions[star]  # [B, H, N, N]
    keys = captured["k"]  # [B, N, C] (with bias, before scaling)
    batch, length, width = X_all.shape
    keys = keys.view(batch, length, heads, width // heads).mean(dim=2)  # K-bar: mean over heads

    results = []
    for b in range(batch):
        X = X_all[b]
        s = attention[b, :, 0, 1:].sum(dim=0)  # CLS row, heads summed, patches only
        top = (torch.topk(s, d - 1).indices + 1).tolist()
        D = sorted([0] + top)
        R = [i for i in range(length) if i not in set(D)]
        M = len(R)
        k_hat = {i: keys[b, i] / keys[b, i].norm() for i in R}
        step = max(1, M // c)
        T = [R[rank] for rank in range(0, M, step)][:c]
        U = [i for i in R if i not in set(T)]
        target_keys = torch.stack([k_hat[t] for t in T])  # [c, Dh]
        assignment = {}
        for u in U:
            similarities = (target_keys @ k_hat[u]).tolist()  # <k_u, k_T_m> for every target m
            best = 0
            for m in range(1, len(T)):
                if similarities[m] > similarities[best]:  # strict: on ties the first target wins
                    best = m
            assignment[u] = best
        ctx = []
        for m, t in enumerate(T):
            members = [u for u in U if assignment[u] == m]
            merged = X[t].clone()
            if members:
                merged = merged + torch.stack([X[u] for u in members]).sum(dim=0) / len(members)
            ctx.append(merged)
        tokens = torch.cat([X[D], torch.stack(ctx)], dim=0)
        results.append((tokens, set(D), T, assignment, X.abs().max()))
    return results


def assert_matches_reference(model, pixel_values, d, c):
    reference = reference_visionzip(eager_clip_like(model), pixel_values, d, c)
    model.set_compression(visionzip(d, c))
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values=pixel_values)
    assert len(output.pooler_output) == pixel_values.shape[0]
    assert output.last_hidden_state.shape == (pixel_values.shape[0], d + c, model.config.vision_config.hidden_size)
    for b, (tokens, dominant_set, targets, _, scale) in enumerate(reference):
        assert output.dominant_indices[b, 0].item() == 0  # CLS first in the exposed (official) order
        assert set(output.dominant_indices[b].tolist()) == dominant_set
        # Before the projector: the compressed tower tokens.
        error = (output.last_hidden_state[b] - tokens).abs().max() / scale
        assert error <= 1e-5, f"view {b}: relative error {error:.2e}"
        # After the projector: what the LLM receives.
        with torch.no_grad():
            projected = model.model.multi_modal_projector(tokens)
        assert output.pooler_output[b].shape == (d + c, model.config.text_config.hidden_size)
        torch.testing.assert_close(output.pooler_output[b], projected, rtol=1e-5, atol=1e-5 * projected.abs().max().item())


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 48, 48)


SPLITS = [(54, 10), (108, 20), (162, 30), (27, 5), (1, 1), (500, 77)]  # the last one: d + c = N = 577


@pytest.mark.parametrize("depth", [4, 12])
def test_a2_fp32_reference_equality(depth, pixels):
    model = slim_model(vision_layers=depth)
    for d, c in SPLITS:
        assert_matches_reference(model, pixels, d, c)


def test_a2_targets_and_assignments_match_reference(pixels):
    from slimvlm.visionzip import encode_with_visionzip

    model = slim_model(vision_layers=4)
    for d, c in [(54, 10), (27, 5), (1, 1)]:
        reference = reference_visionzip(eager_clip_like(model), pixels, d, c)
        with torch.no_grad():
            selection = encode_with_visionzip(model.model.vision_tower, pixels, 2, d, c)
        for b, (_, _, targets, _, _) in enumerate(reference):
            assert selection.target_indices[b].tolist() == targets


@pytest.mark.parametrize("depth", [3, 24])
def test_a2_clip_336_14_geometry(depth):
    torch.manual_seed(2)
    model = slim_model(vision_layers=depth, image_size=336, patch_size=14)
    pixel_values = torch.randn(1, 3, 336, 336)
    for d, c in [(54, 10), (162, 30)]:
        assert_matches_reference(model, pixel_values, d, c)


def test_sdpa_and_eager_towers_agree(pixels):
    sdpa = slim_model(visionzip(54, 10), attn_implementation="sdpa", vision_layers=4)
    eager = slim_model(visionzip(54, 10), attn_implementation="eager", vision_layers=4)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"
    assert eager.model.vision_tower.config._attn_implementation == "eager"
    with torch.no_grad():
        a = sdpa.model.get_image_features(pixel_values=pixels)
        b = eager.model.get_image_features(pixel_values=pixels)
    for i in range(len(pixels)):
        assert set(a.dominant_indices[i].tolist()) == set(b.dominant_indices[i].tolist())
    scale = a.last_hidden_state.abs().max()
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() / scale <= 1e-5


# --- A3: semantics on synthetic tensors ---------------------------------------------------------------


def synthetic(batch=1, length=17, width=6, dh=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, width, generator=generator)
    scores = torch.rand(batch, length - 1, generator=generator)
    keys = torch.randn(batch, length, dh, generator=generator)
    return features, scores, keys


def test_a3_cls_first_and_exact():
    features, scores, keys = synthetic(batch=3)
    selection = visionzip_select(features, scores, keys, 5, 3)
    assert torch.equal(selection.tokens[:, 0], features[:, 0])


def test_a3_dominant_tokens_in_ascending_position_order():
    features, _, keys = synthetic()
    # Patch scores rise with position, so torch.topk lists them in DESCENDING position order.
    scores = torch.arange(16, dtype=torch.float32).unsqueeze(0)
    selection = visionzip_select(features, scores, keys, 4, 2)
    assert selection.dominant_indices[0].tolist() == [0, 16, 15, 14]  # exposed: official order
    assert torch.equal(selection.tokens[0, :4], features[0, [0, 14, 15, 16]])  # tokens: ascending


def test_a3_targets_stride_over_the_order_of_R_not_the_grid():
    # 4x4 grid, N = 17. Dominant: CLS + the patches at positions 2, 6, 10, 14 -> R has holes (M = 12).
    features, _, keys = synthetic()
    scores = torch.zeros(1, 16)
    scores[0, [1, 5, 9, 13]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # score index j is token j + 1
    selection = visionzip_select(features, scores, keys, 5, 3)
    R = [1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16]
    step = len(R) // 3
    over_R = [R[rank] for rank in range(0, len(R), step)][:3]
    assert over_R == [1, 7, 12]
    over_grid = [p for p in range(1, 17, step) if p not in (2, 6, 10, 14)][:3]  # what a grid stride would pick
    assert over_grid != over_R
    assert selection.target_indices[0].tolist() == over_R


def test_a3_contextual_is_target_plus_mean_of_assigned_and_empty_target_unchanged():
    # N = 9 tokens, d = 1 (CLS only): R = 1..8, c = 4 -> step 2, targets T = [1, 3, 5, 7].
    length, width = 9, 3
    features = torch.arange(length * width, dtype=torch.float32).view(1, length, width) ** 1.5
    scores = torch.rand(1, length - 1)
    e = torch.eye(4)
    keys = torch.zeros(1, length, 4)
    keys[0, 0] = e[0]
    # Target keys: 1 -> e0, 3 -> e1, 5 -> e2, 7 -> e3. Others point (scaled) to a chosen target's direction.
    keys[0, 1], keys[0, 3], keys[0, 5], keys[0, 7] = e[0], e[1], e[2], 3 * e[3]
    keys[0, 2] = 2 * e[0] + 0.1 * e[1]  # -> target 1
    keys[0, 4] = 0.5 * e[0]  # -> target 1
    keys[0, 6] = e[1] + 0.2 * e[2]  # -> target 3
    keys[0, 8] = 5 * e[0] + e[1]  # -> target 1
    selection = visionzip_select(features, scores, keys, 1, 4)
    assert selection.target_indices[0].tolist() == [1, 3, 5, 7]
    X = features[0]
    expected = torch.stack(
        [
            X[1] + (X[2] + X[4] + X[8]) / 3,
            X[3] + X[6],
            X[5],  # nobody joins: unchanged
            X[7],  # nobody joins: unchanged
        ]
    )
    ctx = selection.tokens[0, 1:]
    torch.testing.assert_close(ctx, expected, rtol=1e-6, atol=0)
    assert torch.equal(ctx[2], X[5]) and torch.equal(ctx[3], X[7])
    # Merged with a mean, not a cluster mean (which would be (X1 + X2 + X4 + X8) / 4).
    assert not torch.allclose(ctx[0], (X[1] + X[2] + X[4] + X[8]) / 4)


def test_a3_assignment_ties_go_to_the_first_target():
    length = 5
    features = torch.randn(1, length, 2)
    keys = torch.zeros(1, length, 2)
    keys[0, :, 0] = 1.0  # every key identical: all similarities tie
    selection = visionzip_select(features, torch.rand(1, length - 1), keys, 1, 2)  # R = 1..4, T = [1, 3]
    X = features[0]
    torch.testing.assert_close(selection.tokens[0, 1], X[1] + (X[2] + X[4]) / 2)
    assert torch.equal(selection.tokens[0, 2], X[3])


def test_a3_views_in_a_batch_are_independent():
    features, scores, keys = synthetic(batch=3, seed=3)
    together = visionzip_select(features, scores, keys, 6, 4)
    for b in range(3):
        alone = visionzip_select(features[b : b + 1], scores[b : b + 1], keys[b : b + 1], 6, 4)
        assert torch.equal(alone.dominant_indices[0], together.dominant_indices[b])
        torch.testing.assert_close(alone.tokens[0], together.tokens[b], rtol=1e-6, atol=1e-6)


def test_a3_cls_row_heads_summed_and_keys_averaged():
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4)
    layer = modeling_clip.CLIPEncoderLayer(config).eval()
    hidden = torch.randn(2, 9, 16)
    with torch.no_grad():
        scores, mean_keys = cls_attention_and_keys(layer, hidden)
        normed = layer.layer_norm1(hidden)
        q = layer.self_attn.q_proj(normed).view(2, 9, 4, 4).transpose(1, 2)
        k = layer.self_attn.k_proj(normed).view(2, 9, 4, 4).transpose(1, 2)
        full = torch.softmax(q @ k.transpose(2, 3) / 2.0, dim=-1)  # Dh = 4 -> scale 1/2, softmax over all N
    torch.testing.assert_close(scores, full[:, :, 0, 1:].sum(dim=1), rtol=1e-6, atol=1e-7)
    # Summed, not averaged: CLS's own share plus the patch scores add up to the number of heads.
    totals = scores.sum(dim=1) + full[:, :, 0, 0].sum(dim=1)
    torch.testing.assert_close(totals, torch.full((2,), 4.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean_keys, k.mean(dim=1), rtol=1e-6, atol=1e-7)


# --- A1 errors --------------------------------------------------------------------------------------


def test_list_feature_layer_raises():
    # Refused when the config is validated (tests/test_conformance.py covers every order of setting) ...
    with pytest.raises(ValueError, match=r"vision_feature_layer.*\[-2, -1\]"):
        slim_model(visionzip(54, 10), vision_feature_layer=[-2, -1])
    # ... and when passed to the call.
    model = slim_model(visionzip(54, 10))
    with pytest.raises(ValueError, match=r"vision_feature_layer.*\[-2, -1\]"):
        model.model.get_image_features(pixel_values=torch.randn(1, 3, 48, 48), vision_feature_layer=[-2, -1])


def test_tower_with_fewer_than_two_layers_raises():
    model = slim_model(visionzip(54, 10), vision_layers=1)
    with pytest.raises(ValueError, match="at least 2 layers"):
        model.model.get_image_features(pixel_values=torch.randn(1, 3, 48, 48))


def test_tower_without_cls_raises():
    siglip = SiglipVisionConfig(image_size=8, patch_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    text = tiny_llava_config().text_config
    config = SlimLlavaConfig(
        vision_config=siglip.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN_ID, compression=visionzip(4, 2)
    )
    model = SlimLlavaForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="CLS"):
        model.model.get_image_features(pixel_values=torch.randn(1, 3, 8, 8))


def test_mismatched_placeholders_raise_a_helpful_error():
    model = slim_model(visionzip(54, 10))
    processor = make_processor()  # a stock processor writes 576 placeholders
    inputs = processor(images=random_images(1), text=["USER: <image>\n what is this ? ASSISTANT:"], return_tensors="pt")
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 576
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(**inputs)
    message = str(error.value)
    assert "visionzip" in message and "processor" in message.lower() and "compression" in message


# --- A10 isolation ----------------------------------------------------------------------------------


def test_a10_vanilla_models_unchanged_and_nothing_patched(pixels):
    torch.manual_seed(5)
    vanilla_config = tiny_llava_config(vision_layers=4)
    vanilla_clip = CLIPVisionModel(CLIPVisionConfig(**vanilla_config.vision_config.to_dict())).eval()
    vanilla_llava = LlavaForConditionalGeneration(vanilla_config).eval()
    processor = make_processor()
    inputs = processor(images=random_images(1), text=["USER: <image>\n describe ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        clip_before = vanilla_clip(pixel_values=pixels, output_hidden_states=True)
        llava_before = vanilla_llava(**inputs).logits

    slim_a = slim_model(visionzip(54, 10), vision_layers=4)
    slim_b = slim_model(visionzip(27, 5), vision_layers=4)
    with torch.no_grad():
        slim_a.model.get_image_features(pixel_values=pixels)
        slim_b.model.get_image_features(pixel_values=pixels)
        clip_after = vanilla_clip(pixel_values=pixels, output_hidden_states=True)
        llava_after = vanilla_llava(**inputs).logits
    assert torch.equal(clip_before.last_hidden_state, clip_after.last_hidden_state)
    assert torch.equal(clip_before.pooler_output, clip_after.pooler_output)
    assert all(torch.equal(x, y) for x, y in zip(clip_before.hidden_states, clip_after.hidden_states))
    assert torch.equal(llava_before, llava_after)
    # No class-level monkey-patching of the stock classes.
    for cls in (modeling_clip.CLIPAttention, modeling_clip.CLIPEncoderLayer, modeling_clip.CLIPEncoder, CLIPVisionModel, LlavaModel):
        for name in ("forward", "get_image_features"):
            function = getattr(cls, name, None)
            if function is not None:
                assert function.__module__.startswith("transformers."), f"{cls.__name__}.{name} is patched"


def test_a10_two_splits_coexist(pixels):
    a = slim_model(visionzip(54, 10), vision_layers=4)
    b = slim_model(visionzip(27, 5), vision_layers=4)
    with torch.no_grad():
        first = a.model.get_image_features(pixel_values=pixels)
        other = b.model.get_image_features(pixel_values=pixels)
        again = a.model.get_image_features(pixel_values=pixels)
    assert first.last_hidden_state.shape[1] == 64 and other.last_hidden_state.shape[1] == 32
    assert torch.equal(first.last_hidden_state, again.last_hidden_state)
    assert a.image_token_count() == 64 and b.image_token_count() == 32


# --- A13 training --------------------------------------------------------------------------------------


def training_batch(model):
    processor = SlimLlavaProcessor(
        image_processor=make_processor().image_processor,
        tokenizer=make_processor().tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        compression=model.config.compression,
    )
    inputs = processor(images=random_images(2), text=["USER: <image>\n what is this ? ASSISTANT: a red circle"] * 2, return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    return inputs


def test_a13_frozen_tower_gradient_checkpointing_projector_gets_gradient():
    model = slim_model(visionzip(54, 10), vision_layers=4)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.vision_tower.encoder.layers)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    loss = model(**training_batch(model)).loss
    assert torch.isfinite(loss)
    loss.backward()
    projector_grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert projector_grad is not None and projector_grad.abs().sum() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_a13_trainable_tower_with_gradient_checkpointing():
    model = slim_model(visionzip(54, 10), vision_layers=4)
    model.activation_checkpointing_enable()
    model.train()
    layers = model.model.vision_tower.encoder.layers
    calls = []
    mlp_forward = layers[0].mlp.forward

    def counting_forward(*args, **kwargs):  # not a hook: torch does not re-run module hooks on recomputation
        calls.append(1)
        return mlp_forward(*args, **kwargs)

    layers[0].mlp.forward = counting_forward
    loss = model(**training_batch(model)).loss
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # recomputed in backward: the tower's layers really are checkpointed
    assert layers[0].mlp.fc1.weight.grad.abs().sum() > 0  # gradients reach the tower through the kept tokens
    assert layers[2].self_attn.k_proj.weight.grad is not None  # L-2 is used
    assert layers[3].mlp.fc1.weight.grad is None  # layer L-1 is never run


@pytest.mark.parametrize("layer, expected", [(-2, 2), (-1, 3), (2, 1), (4, 3), (-4, 0)])
def test_feature_layer_indexes_hidden_states_like_stock_llava(layer, expected):
    from slimvlm.visionzip import resolve_feature_layer

    # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0] is the embeddings).
    assert resolve_feature_layer(layer, 4) == expected


@pytest.mark.parametrize("layer", [5, 7, -6, 0, -5])
def test_feature_layer_out_of_range_or_embeddings_raises(layer):
    from slimvlm.visionzip import resolve_feature_layer

    with pytest.raises(ValueError, match=str(layer)):
        resolve_feature_layer(layer, 4)
