"""SparseVLM (specs/sparsevlm.md §14): validation, schedule arithmetic, raters, reference parity, DPC-KNN,
rows-only scoring, backends, batching, decoding and serialization, on tiny random Llama-based LLaVA models."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlavaForConditionalGeneration, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from builders import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava_config
from test_sparsevlm_reference import reference_dpc_knn, reference_forward
from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration, normalize_compression
from slimvlm.configuration_slimvlm import SPARSEVLM_BUDGETS
from slimvlm.sparsevlm import (
    SparseVLMCache,
    dpc_knn,
    gravity_weights,
    merge_clusters,
    rater_row_attention,
    raters_from_statistic,
    scaled_budgets,
    sparsevlm_schedule,
    visual_scores,
)

LAYERS = 32  # the 64 preset needs ET >= 2·576/N_L, i.e. N_L >= 18 with the default prune layers
HIDDEN = 32


def sparse(version="1.5", tokens=192, **extra):
    return {"method": "sparsevlm", "version": version, "retained_tokens": tokens, **extra}


def build(compression, seed=0, attn="eager", layers=LAYERS, heads=8, kv_heads=2, head_dim=128, hidden=HIDDEN):
    """Tiny LLaVA-1.5 (576 patches, 1 CLIP layer) over a Llama with `layers` layers and head_dim 128."""
    config = tiny_llava_config(vision_layers=1, text_layers=layers, text_hidden=hidden, heads=heads, kv_heads=kv_heads).to_dict()
    config.pop("model_type", None)
    config["text_config"]["head_dim"] = head_dim
    # Peaked attention (no exact score ties among 576 tokens, which make top-k order implementation-defined).
    config["text_config"]["initializer_range"] = 0.2
    config = SlimLlavaConfig(**config, compression=compression)
    torch.manual_seed(seed)
    model = SlimLlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="module")
def model():
    """32 layers, 8 heads: for the reference parity tests (every preset is feasible at this depth)."""
    return build(sparse())


SMALL_LAYERS = [2, 6, 15]  # the default prune layers, on a 16-layer model


@pytest.fixture(scope="module")
def small():
    """16 layers, 2 heads, SDPA: for the many-forward decoding tests (presets >= 128 are feasible)."""
    return build(sparse("1.5", 128, layers=SMALL_LAYERS), layers=16, heads=2, kv_heads=1, attn="sdpa")


def noise_fn(step, sample, n):
    return torch.rand(n, generator=torch.Generator().manual_seed(100 + step))


def prompt(v0, v, t, seed=0):
    """ids [1, v0 + v + t]: BOS + prefix words, v image tokens, t text words (word ids 6..)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(6, 40, (v0 - 1,), generator=g)
    text = torch.randint(6, 40, (t,), generator=g)
    return torch.cat([torch.tensor([1]), prefix, torch.full((v,), IMAGE_TOKEN_ID), text])[None]


def features(v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BaseModelOutputWithPooling(pooler_output=[torch.randn(v, HIDDEN, generator=g)])


def embeds_of(model, ids, feats):
    e = model.get_input_embeddings()(ids)[0].clone()
    mask = ids[0] == IMAGE_TOKEN_ID
    if feats is not None:
        e[mask] = feats
    return e


# ---------------------------------------------------------------- S1 validation


@pytest.mark.parametrize(
    "bad",
    [
        sparse(tokens=100),
        sparse(layers=[6, 2, 15]),
        sparse(layers=[2, 6, LAYERS]),
        {"method": "sparsevlm", "budgets": [300, 0, 10]},
        {"method": "sparsevlm", "budget_fractions": [0.5, 0.2, 0.0]},
        sparse(tokens=64, layers=[12, 14, 20]),  # ET >= 12·576/32 = 216 > 64: infeasible
        sparse(version="3.0"),
    ],
)
def test_validation_errors(bad):
    with pytest.raises(ValueError):
        normalize_compression(bad, num_text_layers=LAYERS)


def test_two_visual_spans_and_static_cache_raise(model):
    ids = torch.cat([prompt(3, 288, 5), prompt(3, 288, 5)], 1)
    with pytest.raises(ValueError, match="contiguous visual span"):
        model(input_ids=ids, mm_encoder_outputs={"image": features(576)})
    ids = prompt(3, 576, 5)
    static = StaticCache(config=model.config.text_config, max_cache_len=700)
    with pytest.raises(ValueError, match="dynamic cache"):
        model(input_ids=ids, mm_encoder_outputs={"image": features(576)}, past_key_values=static, use_cache=True)
    with pytest.raises(ValueError, match="dynamic cache"):
        model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 48, 48), max_new_tokens=2, cache_implementation="static")


def test_v2_gravity_nonpositive_raises():
    # D = 128, θ = 10000: W(1707) <= 0 (spec §8.1) while W(700) >= 1.19.
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))

    def table(p):
        f = torch.tensor([float(p)])[:, None] * inv[None]
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()

    near = gravity_weights(*table(700), *table(0))
    assert near.min() >= 1.19
    far = gravity_weights(*table(1707), *table(0))
    assert far.item() <= 0
    with pytest.raises(ValueError, match="version '1.5'"):
        visual_scores(torch.rand(4, 1, 1), "2.0", far)


# ---------------------------------------------------------------- S2 schedule arithmetic

TABLE = {
    "1.5": {192: ((309, 204, 113), 192.03125, 206.5), 128: ((312, 117, 39), 128.625, 145.40625),
            96: ((249, 55, 27), 96.9375, 114.09375), 64: ((82, 32, 18), 64.8125, 82.25)},
    "2.0": {192: ((300, 200, 118), 192.4375, None), 128: ((238, 108, 60), 128.0, None),
            96: ((246, 54, 28), 96.8125, None), 64: ((66, 34, 20), 64.4375, None)},
}


@pytest.mark.parametrize("version", ["1.5", "2.0"])
@pytest.mark.parametrize("preset", [192, 128, 96, 64])
def test_schedule_matches_spec_table(version, preset):
    compression = normalize_compression(sparse(version, preset), num_text_layers=32)
    schedule = sparsevlm_schedule(compression, 576, 32)
    counts, et, processed = TABLE[version][preset]
    assert schedule.budgets == list(SPARSEVLM_BUDGETS[version][preset])
    assert schedule.counts == list(counts)
    assert schedule.equal_tokens == et
    if processed is not None:
        assert schedule.processed_mean == processed


def test_schedule_scaled_to_2880():
    c128 = normalize_compression(sparse("1.5", 128), num_text_layers=32)
    c64 = normalize_compression(sparse("1.5", 64), num_text_layers=32)
    assert scaled_budgets(c128, 2880) == [1515, 550, 180]
    assert scaled_budgets(c64, 2880) == [330, 150, 85]
    assert round(sparsevlm_schedule(c128, 2880, 32).equal_tokens, 1) == 640.6
    assert round(sparsevlm_schedule(c64, 2880, 32).equal_tokens, 1) == 322.1
    fractions = normalize_compression({"method": "sparsevlm", "budget_fractions": [0.5, 0.25, 0.1]}, num_text_layers=32)
    assert scaled_budgets(fractions, 1000) == [500, 250, 100]


# ---------------------------------------------------------------- S3 raters


def test_raters_strict_and_fallback():
    assert raters_from_statistic(torch.tensor([1.0, 2.0, 3.0])).tolist() == [2]
    assert raters_from_statistic(torch.tensor([0.5, 0.5])).tolist() == [0, 1]  # empty set -> all text
    assert raters_from_statistic(torch.tensor([1.0])).tolist() == [0]  # T = 1: σ ≡ 1


# ---------------------------------------------------------------- S4 reference parity (+ one decode step)


def _check_against_reference(model, version, v0, v, t, priority_heads=14):
    compression = model.config.compression
    ids = prompt(v0, v, t, seed=v + 1)
    feats = features(v, seed=v + 1)
    model.model.sparsevlm_noise = noise_fn
    with torch.no_grad():
        out = model(input_ids=ids, mm_encoder_outputs={"image": feats}, use_cache=True)
    report = model.model.sparsevlm_report
    budgets = scaled_budgets(compression, v)
    ref_logits, record = reference_forward(
        model, embeds_of(model, ids, feats.pooler_output[0]), v0, v, budgets, compression["layers"], version,
        lambda step, n: noise_fn(step, 0, n), priority_heads,
    )
    assert report.raters[0].tolist() == record["raters"]
    for mine, ref in zip(report.steps[0], record["steps"]):
        kept, recycled, centres, assignment = ref
        assert mine.kept.tolist() == kept
        assert mine.recycled.tolist() == recycled
        assert mine.centres.tolist() == centres
        assert mine.assignment.tolist() == assignment
    assert report.kv_lengths == record["kv_lengths"]
    assert out.logits.shape[1] == ref_logits.shape[0]
    torch.testing.assert_close(out.logits[0], ref_logits, rtol=1e-5, atol=1e-5)
    # One decode step through the ragged cache == the reference on prompt + token, replaying the plan.
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        step = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True,
                     attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long))
    full = embeds_of(model, torch.cat([ids, token], 1), feats.pooler_output[0])
    ref_next, _ = reference_forward(model, full, v0, v, budgets, compression["layers"], version, None, priority_heads,
                                    plan=record["steps"])
    torch.testing.assert_close(step.logits[0, -1], ref_next[-1], rtol=1e-5, atol=1e-5)
    return report, record


SHAPES = [(35, 576, 25), (7, 1000, 40)]  # (v0, V, T) of spec S4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("preset", [192, 128, 96, 64])
def test_v15_matches_reference(model, preset, shape):
    model.set_compression(sparse("1.5", preset))
    report, _ = _check_against_reference(model, "1.5", *shape)
    if shape[1] == 576:
        assert report.layer_counts[0][-1] == TABLE["1.5"][preset][0][-1]
        assert report.equal_tokens[0] == TABLE["1.5"][preset][1]
        assert report.processed_mean[0] == TABLE["1.5"][preset][2]
    expected = sparsevlm_schedule(model.config.compression, shape[1], LAYERS)
    assert report.layer_counts[0] == expected.after and report.processed_counts[0] == expected.processed


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("preset", [192, 128, 96, 64])
def test_v20_matches_reference(model, preset, shape):
    model.set_compression(sparse("2.0", preset, num_priority_heads=3))
    v0, v, t = shape
    report, record = _check_against_reference(model, "2.0", v0, v, t, priority_heads=3)
    # v2.0 keeps the survivors' original ids (the logits match, so the model used these positions too).
    survivors = torch.arange(v0, v0 + v)
    for step in report.steps[0]:
        survivors = survivors[step.kept]
    expected = torch.cat([torch.arange(v0), survivors, torch.arange(v0 + v, v0 + v + t)])
    assert record["positions"][-1].tolist() == expected.tolist()
    if v == 576:
        assert report.equal_tokens[0] == TABLE["2.0"][preset][1]


# ---------------------------------------------------------------- S5 DPC-KNN


def test_dpc_knn_literal():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(40, 16, generator=g)
    noise = torch.rand(40, generator=g)
    centres, assignment = dpc_knn(y, 5, noise)
    ref_centres, ref_assignment = reference_dpc_knn(y, 5, noise)
    assert centres.tolist() == ref_centres  # output order = descending ρ·δ
    assert assignment.tolist() == ref_assignment
    assert all(assignment[c] == i for i, c in enumerate(centres.tolist()))  # centres assigned to themselves
    merged = merge_clusters(y, assignment, 5)
    for c in range(5):
        members = y[assignment == c]
        torch.testing.assert_close(merged[c], members.sum(0) / (len(members) + 1e-6))
    centres, assignment = dpc_knn(y, 1, noise)
    torch.testing.assert_close(merge_clusters(y, assignment, 1)[0], y.mean(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- S6 rows-only scoring


def test_rows_only_scoring_equals_full_matrix_slice():
    g = torch.Generator().manual_seed(0)
    H, Hkv, L, D, pad = 8, 2, 90, 16, 7
    q_all = torch.randn(H, pad + L, D, generator=g)
    k_all = torch.randn(Hkv, pad + L, D, generator=g)
    valid = torch.arange(pad + L) >= pad  # left padding
    k_rep = k_all.repeat_interleave(H // Hkv, 0)
    logits = q_all @ k_rep.transpose(1, 2) / math.sqrt(D)
    allowed = torch.ones(pad + L, pad + L, dtype=torch.bool).tril() & valid[None, :]
    full = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    rows = torch.tensor([60, 70, 75, 80, 89])  # among real tokens
    rows_only = rater_row_attention(q_all[:, pad + rows], k_all[:, pad:], rows, 1 / math.sqrt(D))
    sliced = full[:, pad + rows][:, :, pad:]
    torch.testing.assert_close(rows_only, sliced, rtol=1e-6, atol=1e-7)
    a = visual_scores(rows_only[:, :, 10:50], "1.5")
    b = visual_scores(sliced[:, :, 10:50], "1.5")
    assert torch.topk(a, 12).indices.tolist() == torch.topk(b, 12).indices.tolist()


# ---------------------------------------------------------------- S9 backends


def test_sdpa_matches_eager():
    eager = build(sparse("1.5", 128), layers=16, heads=4)
    sdpa = build(sparse("1.5", 128), layers=16, heads=4, attn="sdpa")
    ids, feats = prompt(35, 576, 25), features(576)
    with torch.no_grad():
        a = eager(input_ids=ids, mm_encoder_outputs={"image": feats})
        b = sdpa(input_ids=ids, mm_encoder_outputs={"image": feats})
    for x, y in zip(eager.model.sparsevlm_report.steps[0], sdpa.model.sparsevlm_report.steps[0]):
        assert x.kept.tolist() == y.kept.tolist()
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- S7 batch == per sample


def _left_pad(rows):
    length = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - r.shape[1]:] = r[0]
        mask[i, length - r.shape[1]:] = 1
    return ids, mask


def _same_plan_up_to_ties(batch_steps, single_steps) -> bool:
    """True when the plans are identical; False when they first differ at a near-tie; fails when they differ
    between scores that are not near-equal. Padding changes the kernels' shapes, so batched scores differ from
    single ones by ~1e-6 relative: near-equal here means within 1e-5 relative."""
    for x, y in zip(batch_steps, single_steps):
        torch.testing.assert_close(x.scores, y.scores, rtol=1e-5, atol=1e-9)
        if x.kept.tolist() == y.kept.tolist() and x.recycled.tolist() == y.recycled.tolist():
            if x.assignment.tolist() == y.assignment.tolist() and x.centres.tolist() == y.centres.tolist():
                continue
            return False  # same recycled tokens, clustering split by their ~1e-6 numeric noise
        # Selections may differ only where the ordered scores agree (a swap of near-equal scores).
        torch.testing.assert_close(x.scores[x.recycled], y.scores[y.recycled], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(x.scores[x.kept].sort().values, y.scores[y.kept].sort().values, rtol=1e-5, atol=1e-9)
        return False
    return True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_equals_single(attn):
    """Mixed prompt lengths, left padding, different V per sample (NeXT-like), one sample without image."""
    model = build(sparse("1.5", 128), attn=attn, layers=16, heads=4)
    rows = [prompt(35, 576, 25, seed=1), prompt(5, 400, 12, seed=2), prompt(9, 0, 20, seed=3)]
    feats = [features(576, 1).pooler_output[0], features(400, 2).pooler_output[0]]
    ids, mask = _left_pad(rows)
    enc = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=enc)
    batch_report = model.model.sparsevlm_report
    assert not torch.isnan(batch.logits).any()
    assert batch_report.visual_tokens == [576, 400, 0]
    for i, row in enumerate(rows):
        enc_i = {"image": BaseModelOutputWithPooling(pooler_output=[feats[i]])} if i < 2 else None
        with torch.no_grad():
            single = model(input_ids=row, mm_encoder_outputs=enc_i)
        report = model.model.sparsevlm_report
        if not _same_plan_up_to_ties(batch_report.steps[i], report.steps[0]):
            # A near-tie went the other way: compare the numerics under the batch's plan.
            with torch.no_grad():
                single = model(input_ids=row, mm_encoder_outputs=enc_i, sparsevlm_plan=[batch_report.steps[i]])
        n = single.logits.shape[1]
        torch.testing.assert_close(batch.logits[i, -n:], single.logits[0], rtol=1e-4, atol=1e-4)
        assert batch_report.layer_counts[i] == model.model.sparsevlm_report.layer_counts[0]
    # The image-less sample equals the dense stock model.
    stock = LlavaForConditionalGeneration(model.config).eval()
    stock.load_state_dict(model.state_dict())
    stock.set_attn_implementation(attn)
    with torch.no_grad():
        dense = stock(input_ids=rows[2])
    torch.testing.assert_close(batch.logits[2, -rows[2].shape[1]:], dense.logits[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- S8 decoding


def _replay_greedy(model, ids, pixel_values, plan, steps):
    """Cache-free greedy loop: each step runs the whole prompt + generated tokens, replaying the prefill plan."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values, sparsevlm_plan=plan, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_generate_equals_cache_free_replay(small, version):
    model = small
    model.set_compression(sparse(version, 128, layers=SMALL_LAYERS))
    model.model.sparsevlm_noise = None
    ids = prompt(35, 576, 25)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, a, o: seen.append(a[1].clone()))
    try:
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, do_sample=False)
    finally:
        hook.remove()
    report = model.model.sparsevlm_report
    replay = _replay_greedy(model, ids, pixels, report.steps, 32)
    assert generated.tolist() == replay.tolist()
    # Decode positions: v1.5 = that segment's own cache length L_s + t; v2.0 = L + t in every segment.
    segment_lengths = list(dict.fromkeys(report.real_kv_lengths[0]))  # one rotary call per segment with layers
    steps = [p for p in seen if p.shape[-1] == 1]  # decode calls (one new token); prefill calls cover the prompt
    for t in range(3):
        decode = steps[len(segment_lengths) * t: len(segment_lengths) * (1 + t)]
        expected = [s + t for s in segment_lengths] if version == "1.5" else [ids.shape[1] + t] * len(segment_lengths)
        assert [int(p.flatten()[-1]) for p in decode] == expected


def test_generation_modes(small):
    model = small
    model.set_compression(sparse("1.5", 128, layers=SMALL_LAYERS))
    rows = [prompt(35, 576, 25, seed=1), prompt(10, 576, 8, seed=2)]
    ids, mask = _left_pad(rows)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6)
    greedy = model.generate(**kwargs, do_sample=False)
    assert model.generate(**kwargs, do_sample=False, num_beams=1).tolist() == greedy.tolist()
    torch.manual_seed(5)
    first = model.generate(**kwargs, do_sample=True, top_k=5)
    torch.manual_seed(5)
    assert model.generate(**kwargs, do_sample=True, top_k=5).tolist() == first.tolist()
    beams = model.generate(**kwargs, do_sample=False, num_beams=3)
    assert beams.shape == greedy.shape
    # Beam search reorders the cache and its per-segment masks: batched beams == per-sample beams.
    for i, row in enumerate(rows):
        single = model.generate(input_ids=row, pixel_values=pixels[i : i + 1], max_new_tokens=6, num_beams=3)
        assert single[0, -6:].tolist() == beams[i, -6:].tolist()
    # Batch == single under generate (greedy).
    for i, row in enumerate(rows):
        single = model.generate(input_ids=row, pixel_values=pixels[i : i + 1], max_new_tokens=6, do_sample=False)
        assert single[0, -6:].tolist() == greedy[i, -6:].tolist()


def test_cache_reorder_moves_masks():
    cache = SparseVLMCache(None, [0, 3], "1.5")
    cache.segment_masks = [torch.tensor([[1, 1], [0, 1]]).bool(), torch.tensor([[0, 1], [1, 1]]).bool()]
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.segment_masks[0].tolist() == [[False, True], [False, True]]
    assert cache.segment_masks[1].tolist() == [[True, True], [True, True]]


# ---------------------------------------------------------------- isolation, training, serialization


def test_rng_untouched_and_training_dense(small):
    model = small
    model.set_compression(sparse("1.5", 192, layers=SMALL_LAYERS))
    model.model.sparsevlm_noise = None
    ids, feats = prompt(35, 576, 25), features(576)
    state = torch.get_rng_state()
    with torch.no_grad():
        model(input_ids=ids, mm_encoder_outputs={"image": feats})
    assert torch.equal(state, torch.get_rng_state())
    model.train()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, mm_encoder_outputs={"image": feats})
    finally:
        model.eval()
    assert out.logits.shape[1] == ids.shape[1]  # dense


def test_save_and_load_with_remote_code(tmp_path):
    model = build(sparse("2.0", 128, seed=3), layers=16, heads=4)
    model.save_pretrained(tmp_path)
    ids = prompt(35, 576, 25)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
    torch.save({"ids": ids, "pixels": pixels, "logits": expected}, tmp_path / "io.pt")
    script = f"""
import torch
from transformers import AutoModelForImageTextToText
m = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, attn_implementation="eager").eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
assert m.config.compression == {{"method": "sparsevlm", "version": "2.0", "retained_tokens": 128, "layers": [2, 6, 15],
                                 "num_priority_heads": 14, "seed": 3}}, m.config.compression
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    got = m(input_ids=io["ids"], pixel_values=io["pixels"]).logits
assert torch.equal(got, io["logits"]), (got - io["logits"]).abs().max()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_quantized_language_model_runs(tmp_path):
    """4-bit and 8-bit (bitsandbytes, CPU): SparseVLM only calls modules, never reads a quantised `.weight`."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    # hidden 128: bitsandbytes' CPU 4-bit kernel needs in_features >= its block size (64).
    build(sparse("1.5", 128, layers=[1, 3, 6]), layers=8, heads=2, kv_heads=1, hidden=128).save_pretrained(tmp_path)
    ids, pixels = prompt(35, 576, 25), torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    for quantization in (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
                         BitsAndBytesConfig(load_in_8bit=True)):
        model = SlimLlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
        assert "Linear" in type(model.model.language_model.layers[0].self_attn.q_proj).__name__
        assert type(model.model.language_model.layers[0].self_attn.q_proj) is not torch.nn.Linear
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 3)
        assert model.model.sparsevlm_report.layer_counts[0][-1] == 39  # 128-preset count after step 3


def test_bfloat16_runs_with_fp32_scoring():
    """Half precision: layers run in bf16; raters, scoring softmax and DPC-KNN are computed in fp32 (spec §10)."""
    model = build(sparse("1.5", 128, layers=[1, 3, 6]), layers=8, heads=2, kv_heads=1, attn="sdpa").to(torch.bfloat16)
    ids, pixels = prompt(35, 576, 25), torch.randn(1, 3, 48, 48, dtype=torch.bfloat16)
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert all(torch.isfinite(step).all() for step in out.logits)
    report = model.sparsevlm_report
    assert [step.count for step in report.steps[0]] == [312, 117, 39]
    assert all(step.scores.dtype == torch.float32 for step in report.steps[0])
