"""Efficiency beside accuracy: what one lmms-eval run of the `slimvlm` backend spent.

Per batch the backend records the visual tokens each sample kept (SparseVLM: its equal-token count and the
per-layer counts), the prefill time, the time to first token and the KV-cache bytes each sample's prompt
left; `EfficiencyLog.summary()` adds the run's peak memory and averages everything per sample.

Definitions (the same for every method, so rows compare):
- prefill: wall-clock seconds of the forward passes that read the prompt, from the first one's start to the
  end of the one that yields the first new token: the vision tower, the compression and the LLM over the
  prompt (VoCo: stage 1, compressing the image into its VoCo K/V, plus stage 2's text prefill).
- time to first token: from the start of the batch (preprocessing: image processor and tokenizer included)
  to the end of that first forward.
- KV-cache bytes: keys + values of the tokens each sample's prompt leaves in the cache, every layer, in the
  model's dtype (SparseVLM: each layer's own, pruned, length).
- peak memory: on CUDA `torch.cuda.max_memory_allocated` since the model started loading; on CPU the
  process's peak resident set size (`ru_maxrss`: the whole process, lmms-eval and the data included).
Times are per batch; per-sample figures divide by the batch size.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class BatchRecord:
    """One batch of one task: per-sample lists are in batch order."""

    task: str
    samples: int
    visual_tokens: list[float]  # reaching the LLM (SparseVLM: equal tokens, the mean over its layers)
    kv_bytes: list[int]
    prefill_s: float
    ttft_s: float
    layer_counts: list[list[int]] | None = None  # SparseVLM: visual tokens after each decoder layer


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory in bytes and what was measured."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_max_allocated"}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB; macOS: bytes
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": int(kilobytes * scale), "peak_memory_kind": "process_peak_rss"}


@dataclass
class EfficiencyLog:
    """Everything one backend instance measured, grouped by task."""

    model: str
    compression: dict
    device: str
    dtype: str
    records: list[BatchRecord] = field(default_factory=list)

    def add(self, record: BatchRecord) -> None:
        self.records.append(record)

    @staticmethod
    def _summarise(records: list[BatchRecord]) -> dict:
        samples = sum(r.samples for r in records)
        tokens = [t for r in records for t in r.visual_tokens]
        summary = {
            "samples": samples,
            "batches": len(records),
            "visual_tokens_per_sample": _mean(tokens),
            "kv_cache_bytes_per_sample": _mean([b for r in records for b in r.kv_bytes]),
            "prefill_s_per_batch": _mean([r.prefill_s for r in records]),
            "prefill_ms_per_sample": 1e3 * sum(r.prefill_s for r in records) / samples if samples else None,
            "ttft_s_per_batch": _mean([r.ttft_s for r in records]),
            "ttft_ms_per_sample": 1e3 * sum(r.ttft_s for r in records) / samples if samples else None,
        }
        counts = [c for r in records if r.layer_counts for c in r.layer_counts]
        if counts:  # SparseVLM: the mean visual count after each layer, over the samples
            summary["equal_tokens_per_sample"] = summary["visual_tokens_per_sample"]
            summary["layer_counts_mean"] = [sum(column) / len(column) for column in zip(*counts)]
        return summary

    def summary(self) -> dict:
        """Per task and over all tasks; plus the run's settings and peak memory."""
        tasks = sorted({r.task for r in self.records})
        return {
            "model": self.model,
            "compression": self.compression,
            "device": self.device,
            "dtype": self.dtype,
            **peak_memory(torch.device(self.device)),
            "overall": self._summarise(self.records),
            "tasks": {task: self._summarise([r for r in self.records if r.task == task]) for task in tasks},
        }

    def to_dict(self, per_batch: bool = True) -> dict:
        result = self.summary()
        if per_batch:
            result["batches"] = [asdict(r) for r in self.records]
        return result


class PrefillTimer:
    """Times a batch: `start()` before preprocessing; hooks on `model` catch the end of the first forward
    (the prefill that yields the first token) inside `generate()`. `extra_prefill_s` adds stages that run
    outside `model.forward` (VoCo's compression). Synchronises CUDA so GPU times are real."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.sync = model, device.type == "cuda"
        self.batch_start = self.forward_start = self.first_end = None
        self.extra_prefill_s = 0.0
        self.handles = []

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _before(self, module, args) -> None:
        if self.forward_start is None:
            self.forward_start = self._now()

    def _after(self, module, args, output) -> None:
        if self.first_end is None:
            self.first_end = self._now()

    def __enter__(self) -> "PrefillTimer":
        self.handles = [self.model.register_forward_pre_hook(self._before), self.model.register_forward_hook(self._after)]
        self.batch_start = self._now()
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()

    def timed(self, function, *args, **kwargs):
        """Run a prefill stage outside `model.forward` (VoCo stage 1) and count its time as prefill."""
        start = self._now()
        result = function(*args, **kwargs)
        self.extra_prefill_s += self._now() - start
        return result

    @property
    def prefill_s(self) -> float:
        return self.extra_prefill_s + (self.first_end - self.forward_start)

    @property
    def ttft_s(self) -> float:
        return self.first_end - self.batch_start
