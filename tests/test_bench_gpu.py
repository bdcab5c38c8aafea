"""benchmarks/bench_gpu.py, the accelerator benchmark, as a smoke test: `--device cpu --tiny` runs the same code
path as the GPU run (every family x method, the FLOP model at the shapes that ran, the JSON and the plot).
No timing is asserted; only what the run must produce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_bench(output: Path, *options: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--tiny",
                                "--output", str(output), *options], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text()), output, completed.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("bench_gpu") / "gpu_tiny.json")


def test_every_family_and_method_has_a_row_with_the_flop_ideal_ratio(tiny_run):
    import bench_gpu

    result, _, _ = tiny_run
    assert {"device", "torch", "transformers", "rows"} <= set(result) and result["complete"]
    rows = result["rows"]
    required = {"family", "method", "setting", "visual_tokens", "prefill_ms", "ttft_ms", "decode_tokens_per_s",
                "peak_memory_bytes", "method_step_peak_bytes", "speedup", "flop_ideal_speedup"}
    assert {(row["family"], row["method"]) for row in rows} == {
        (family, method) for family in bench_gpu.FAMILIES for method in bench_gpu.METHODS}
    for row in rows:
        if row.get("skipped"):  # a method the family's config refuses: recorded, never measured
            assert row["skipped"].startswith("unsupported by this family: ValueError"), row
            assert row["method"] in bench_gpu.FAMILIES[row["family"]].config_class.unsupported_methods, row
            continue
        assert required <= set(row), (row["setting"], required - set(row))
        # A setting may record an error (e.g. a static cache under SparseVLM) but still has its prefill and ratio.
        assert "setting" not in row.get("errors", {}) and "prefill" not in row.get("errors", {}), row
        assert row["flop_ideal_speedup"] > 0 and row["prefill_ms"] > 0 and row["ttft_ms"] > 0, row["setting"]
        assert row["peak_memory_bytes"] > 0, row["setting"]


def test_flop_ideal_ratio_follows_the_token_counts(tiny_run):
    result, _, _ = tiny_run
    for family in {row["family"] for row in result["rows"]}:
        rows = [row for row in result["rows"] if row["family"] == family and not row.get("skipped")]
        dense = next(row for row in rows if row["method"] == "none")
        assert dense["flop_ideal_speedup"] == 1.0
        visionzip = sorted((row for row in rows if row["method"] == "visionzip"), key=lambda row: -row["visual_tokens"])
        ratios = [row["flop_ideal_speedup"] for row in visionzip]
        assert ratios == sorted(ratios), (family, ratios)
        # At the published shapes VisionZip always saves FLOPs (at --tiny widths Qwen's extra QK^T over 5,184
        # patches can outweigh a 32-wide LLM); OneVision's --tiny shrinks its token counts: no real-shape ratio.
        real = [row["flop_ideal_speedup_real_shapes"] for row in visionzip]
        if family == "llava-onevision":
            assert real == [None] * len(real) and all(ratio > 1 for ratio in ratios), (family, ratios)
        else:
            assert all(ratio > 1 for ratio in real) and real == sorted(real), (family, real)
        if not family.startswith("qwen"):
            assert all(ratio > 1 for ratio in ratios), (family, ratios)
        assert [row["visual_tokens"] for row in visionzip] == [row["budget"] for row in visionzip]
        for row in rows:
            if row["method"] == "sparsevlm":  # pruning inside the LLM: placeholders stay, the FLOPs fall
                assert row["visual_tokens"] == dense["visual_tokens"] and row["flop_ideal_speedup"] > 1
                assert row["equal_tokens"] < dense["visual_tokens"]
            if row["method"] in ("cdpruner", "divprune"):  # K per view before the LLM: VisionZip's budgets
                # (OneVision's --tiny shrinks its token counts: no real-shape ratio, as for its VisionZip rows.)
                ideal = row["flop_ideal_speedup" if family == "llava-onevision" else "flop_ideal_speedup_real_shapes"]
                assert row["visual_tokens"] == row["budget"] and ideal > 1, row["setting"]
                assert row["budget"] in [r["budget"] for r in visionzip]
            if row["method"] == "voco":  # the answer runs on K cached tokens per group, not on the image
                assert row["visual_tokens"] == row["cached_tokens"] < 10 and row["flop_ideal_speedup"] > ratios[-1]


def test_steps_are_measured_and_the_memory_check_is_printed_per_family_and_method(tiny_run):
    result, output, stdout = tiny_run
    measured = [row for row in result["rows"] if not row.get("skipped")]
    for row in measured:
        if row["method"] != "none":
            assert row["method_step_peak_bytes"] > 0 and row["method_step_ms"] > 0, row["setting"]
            assert isinstance(row["memory_never_worse"], bool), row["setting"]
            assert row["uncompressed_prefill_peak_bytes"] > 0
        assert row["decode_mode"]  # the mode the row decoded in (CPU: no compile, said in the row)
        if row["method"] == "sparsevlm":  # SparseVLM refuses a static cache: recorded, then a dynamic cache
            assert "static" in " ".join(row["errors"]) and row["decode_mode"].startswith("dynamic")
    assert "memory never worse" in stdout
    assert sum("OK (never worse)" in line or "WORSE" in line for line in stdout.splitlines()) == sum(
        row["method"] != "none" for row in measured)
    assert output.with_suffix(".png").stat().st_size > 10_000


def test_a_failing_compiled_decode_is_recorded_and_the_row_falls_back(tmp_path):
    """--cpu-compile tries fullgraph capture on CPU (as the GPU run does with inductor): whether it works or not,
    every row ends with a decode mode and the errors of the modes it could not use."""
    result, _, _ = run_bench(tmp_path / "compile.json", "--quick", "--cpu-compile", "--families", "llava-1.5")
    rows = result["rows"]
    assert [row["method"] for row in rows] == ["none", "visionzip", "sparsevlm", "voco", "cdpruner", "divprune"]
    for row in rows:
        compiled = row["decode_mode"].startswith("static+compile")
        tried = any(key.startswith("decode static+compile") for key in row.get("errors", {}))
        assert compiled != tried, row  # either it compiled, or its failure is in the row
        assert row["ttft_ms"] > 0


def test_real_shape_configs_build_on_the_meta_device_in_bf16_at_the_published_sizes():
    """The configs in benchmarks/configs/ are the 7B models: built the way the GPU run builds them (bf16, directly
    on the target device; here the meta device, no memory), their parameter counts are the published ones."""
    import torch

    import bench_gpu

    # The Hub's model-card counts.
    published = {"llava-1.5": 7.06e9, "llava-next": 7.06e9, "video-llava": 7.37e9, "llava-onevision": 8.03e9,
                 "qwen2.5-vl": 8.29e9, "qwen3-vl": 8.77e9}
    depth = {"llava-onevision": 28, "qwen2.5-vl": 28, "qwen2.5-vl-1008": 28, "qwen3-vl": 36}
    counts = {}
    for name, family in bench_gpu.FAMILIES.items():
        model = bench_gpu.build_model(family, "meta", tiny=False, attn="sdpa")
        parameters = list(model.parameters())
        assert {p.dtype for p in parameters} == {torch.bfloat16} and {p.device.type for p in parameters} == {"meta"}
        assert model.config.text_config.num_hidden_layers == depth.get(name, 32)
        counts[name] = sum(p.numel() for p in parameters)
    for name, count in published.items():
        assert abs(counts[name] - count) < 0.01 * count, (name, counts[name])
    # MGM-7B-HD: LLaVA-1.5-7B + the ConvNeXt-L trunk (~0.2 B) + patch-info mining.
    assert 0.15e9 < counts["mgm-hd"] - counts["llava-1.5"] < 0.3e9, counts


def test_a_spent_time_budget_skips_the_remaining_rows_and_still_writes_the_result(tmp_path):
    import bench_gpu

    result = bench_gpu.main(["--device", "cpu", "--tiny", "--families", "llava-1.5", "--time-budget-s", "1e-9",
                             "--output", str(tmp_path / "skipped.json")])
    rows = json.loads((tmp_path / "skipped.json").read_text())["rows"]
    assert result["complete"] and len(rows) == 8  # 1 + 2 VisionZip + 2 SparseVLM (--tiny) + VoCo + CDPruner + DivPrune
    assert all(row["skipped"] == "time budget spent" and row["flop_ideal_speedup"] is None for row in rows)


def test_method_steps_at_the_published_widths_stay_far_below_the_uncompressed_kv_cache(tmp_path):
    """--real-shape-steps: VisionZip's, SparseVLM's, CDPruner's and DivPrune's own steps on 7B-width tensors (only the layer they use is
    materialised) peak far below the KV cache the uncompressed prefill must hold: no N x N attention matrix."""
    import bench_gpu

    result = bench_gpu.main(["--device", "cpu", "--real-shape-steps", "--quick", "--families", "llava-1.5",
                             "--output", str(tmp_path / "steps.json")])
    checks = result["real_shape_step_check"]
    assert [row["setting"] for row in checks] == ["visionzip 64", "sparsevlm 64", "cdpruner 64", "divprune 64"]
    full_attention = 32 * 616 * 616 * 4  # one layer's fp32 attention probabilities over the 616-token prompt
    for row in checks:
        assert row["memory_never_worse"] and 0 < row["method_step_peak_bytes"] < full_attention, row
