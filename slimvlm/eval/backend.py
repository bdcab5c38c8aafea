"""The `slimvlm` lmms-eval model backend: any Slim family, any compression, from a stock or slim checkpoint.

    slimvlm eval --model slimvlm --tasks gqa --batch_size 8 --output_path out \
        --model_args 'pretrained=llava-hf/llava-1.5-7b-hf,compression={"method":"visionzip","tokens":64},dtype=float16'

Model arguments (lmms-eval's `key=value,...`; a JSON value may contain commas, lmms-eval splits around braces):
  pretrained            checkpoint folder or Hub id of any supported family, stock or slim (slimvlm.auto.families())
  compression           JSON compression dict (default: the checkpoint's own; a stock checkpoint: none)
  dtype                 auto (the checkpoint's) | float32 | float16 | bfloat16
  device                cpu | cuda | cuda:N (default: cuda when available); ignored with device_map
  device_map            passed to from_pretrained (e.g. auto)
  attn_implementation   sdpa | eager | ... (passed to from_pretrained)
  load_in_4bit, load_in_8bit   bitsandbytes quantization of the language model
  prompt_format         auto | chat_template | llava | vicuna_v1 (VoCo checkpoints always use the VoCo layout)
  system_prompt         overrides the layout's system prompt (vicuna_v1, VoCo; "" for none)
  revision              Hub revision
  batch_size            lmms-eval's --batch_size (images per generate call; left padding)

Video inputs are not handled yet (no Slim video family is available in this version).
"""

from __future__ import annotations

import json
import warnings

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ..auto import family_of
from .efficiency import BatchRecord, EfficiencyLog, PrefillTimer

PROMPT_FORMATS = ("auto", "chat_template", "llava", "vicuna_v1")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# LLaVA's official evaluation prompt (conv_vicuna_v1), as the VisionZip and SparseVLM papers evaluated.
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
GENERATE_KEYS = ("top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty")
LMMS_IGNORED_KEYS = ("max_batch_size",)  # passed by lmms-eval to every backend
DEFAULT_MAX_NEW_TOKENS = 128

RUNS: list[EfficiencyLog] = []  # every backend's log, in creation order (`slimvlm eval` writes them out)


def parse_compression(value) -> dict | None:
    """model_args compression: a JSON object string (or a dict from Python); None keeps the checkpoint's."""
    from ..configuration_slimvlm import normalize_compression

    if value is None or isinstance(value, dict):
        compression = value
    else:
        try:
            compression = json.loads(str(value))
        except json.JSONDecodeError as error:
            raise ValueError(f"model_args compression must be JSON such as "
                             f"compression={{\"method\":\"visionzip\",\"tokens\":64}}, got {value!r} ({error})") from error
        if not isinstance(compression, dict):
            raise ValueError(f"model_args compression must be a JSON object such as {{\"method\":\"none\"}}, got {value!r}")
    if compression is not None:
        try:
            normalize_compression(compression)
        except (TypeError, ValueError) as error:
            raise type(error)(f"model_args compression: {error}") from error
    return compression


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "false", "0"):
        return str(value).lower() in ("true", "1")
    raise ValueError(f"model_args {name} must be true or false, got {value!r}")


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"model_args {name} must be one of {list(allowed)}, got {value!r}")
    return value


# The answer-format suffixes the official CDPruner evaluation strips from the instruction (specs/cdpruner.md §5.1).
ANSWER_FORMAT_SUFFIXES = ("\nAnswer the question using a single word or phrase.",
                          "\nAnswer with the option's letter from the given choices directly.")


def cdpruner_instruction(context: str) -> str:
    """A task's context as CDPruner's instruction: the question, its answer-format suffix removed."""
    context = context.strip()
    for suffix in ANSWER_FORMAT_SUFFIXES:
        if context.endswith(suffix):
            return context[: -len(suffix)].strip()
    return context


class SlimVLM(lmms):
    """lmms-eval backend around a Slim model (`generate_until`; batched with left padding)."""

    is_simple = True

    def __init__(self, pretrained: str, compression=None, dtype: str = "auto", device: str | None = None,
                 device_map: str | None = None, attn_implementation: str | None = None, load_in_4bit=False,
                 load_in_8bit=False, prompt_format: str = "auto", system_prompt: str | None = None,
                 revision: str | None = None, batch_size=1, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(LMMS_IGNORED_KEYS))
        if unknown:
            allowed = ["pretrained", "compression", "dtype", "device", "device_map", "attn_implementation",
                       "load_in_4bit", "load_in_8bit", "prompt_format", "system_prompt", "revision", "batch_size"]
            raise TypeError(f"model_args: unknown argument(s) {unknown} for the slimvlm backend; allowed: {allowed}")
        compression = parse_compression(compression)
        dtype = _choice("dtype", str(dtype), DTYPES)
        self.prompt_format = _choice("prompt_format", str(prompt_format), PROMPT_FORMATS)
        self.system_prompt = None if system_prompt is None else str(system_prompt)
        quantize = {"load_in_4bit": _flag("load_in_4bit", load_in_4bit), "load_in_8bit": _flag("load_in_8bit", load_in_8bit)}
        if all(quantize.values()):
            raise ValueError("model_args load_in_4bit and load_in_8bit are exclusive; choose one")
        try:
            self.batch_size_per_call = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a positive integer for the slimvlm backend, got {batch_size!r}") from None
        if self.batch_size_per_call < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

        family = family_of(str(pretrained), revision=revision)
        overrides = {} if compression is None else {"compression": compression}  # None keeps a slim checkpoint's own
        config = family.config.from_pretrained(pretrained, revision=revision, **overrides)
        load = {"config": config, "revision": revision, "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
                "device_map": device_map or str(self._device)}
        if attn_implementation:
            load["attn_implementation"] = str(attn_implementation)
        if any(quantize.values()):
            from transformers import BitsAndBytesConfig

            load["quantization_config"] = BitsAndBytesConfig(**quantize)
        self.model = family.generation.from_pretrained(pretrained, **load).eval()
        self.processor = family.processor.from_pretrained(pretrained, revision=revision, compression=self.model.config.compression)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.method = self.model.config.compression["method"]
        if self.method == "voco" and self.prompt_format not in ("auto",):
            raise ValueError(f"model_args prompt_format={self.prompt_format!r}: a VoCo model answers in the VoCo layout "
                             "(image first, then the turn); leave prompt_format unset")
        self.pretrained = str(pretrained)
        self.efficiency = EfficiencyLog(self.pretrained, dict(self.model.config.compression), str(self._input_device),
                                        str(self.model.dtype).removeprefix("torch."))
        RUNS.append(self.efficiency)

    # ------------------------------------------------------------------ lmms-eval interface

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def _input_device(self) -> torch.device:
        return self.model.device if hasattr(self.model, "device") else self._device

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("the slimvlm backend supports generate_until tasks only (loglikelihood tasks are not implemented)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the slimvlm backend does not implement multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def by_length(args):  # longest first: less padding per batch; the order is restored below
            return -len(self.tokenizer(args[0])["input_ids"]), args[0]

        ordered = lmms_utils.Collator([request.args for request in requests], by_length, grouping=True)
        answers = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="slimvlm responding") as bar:
            for chunk in ordered.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
                visuals = [doc_to_visual[i](self.task_dict[tasks[i]][splits[i]][doc_ids[i]]) for i in range(len(chunk))]
                texts = self._generate(list(contexts), visuals, dict(all_gen_kwargs[0]), tasks[0])
                for context, gen_kwargs, text in zip(contexts, all_gen_kwargs, texts):
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                answers += texts
                bar.update(len(chunk))
        return ordered.get_original(answers)

    # ------------------------------------------------------------------ prompts and generation

    def _images(self, visual) -> list[Image.Image]:
        items = visual if isinstance(visual, (list, tuple)) else [visual]
        for item in items:
            if not isinstance(item, Image.Image):
                raise NotImplementedError(f"the slimvlm backend handles images only; got a {type(item).__name__} "
                                          "(video tasks need a Slim video family, not available in this version)")
        return [item.convert("RGB") for item in items]

    def prompt(self, context: str, images: int) -> str:
        """The family's prompt around a task's text, with one image placeholder per image."""
        image_token = self.processor.image_token
        fmt = self.prompt_format
        if fmt == "auto":
            fmt = "chat_template" if getattr(self.processor, "chat_template", None) else "llava"
        if fmt == "chat_template":
            if not getattr(self.processor, "chat_template", None):
                raise ValueError(f"model_args prompt_format=chat_template: {self.pretrained} has no chat template; "
                                 "use prompt_format=llava or vicuna_v1")
            content = [{"type": "image"}] * images + [{"type": "text", "text": context.replace(image_token, "").strip()}]
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if image_token not in context:
            context = " ".join([image_token] * images) + "\n" + context if images else context
        system = self.system_prompt if self.system_prompt is not None else (VICUNA_V1_SYSTEM if fmt == "vicuna_v1" else "")
        return (f"{system} " if system else "") + f"USER: {context} ASSISTANT:"

    def _generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        until = gen_kwargs.pop("until", None) or [self.tokenizer.eos_token]
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", temperature > 0))
        settings = {"max_new_tokens": int(gen_kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), "do_sample": do_sample,
                    "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            settings["temperature"] = temperature
        settings.update({key: gen_kwargs.pop(key) for key in GENERATE_KEYS if gen_kwargs.get(key) is not None})
        if gen_kwargs:
            warnings.warn(f"slimvlm backend: ignoring generation arguments {sorted(gen_kwargs)}", stacklevel=2)
        return settings, until

    @torch.inference_mode()
    def _generate(self, contexts: list[str], visuals: list, gen_kwargs: dict, task: str) -> list[str]:
        settings, until = self._generation_settings(gen_kwargs)
        images = [self._images(v) for v in visuals]
        with PrefillTimer(self.model, self._input_device) as timer:
            if self.method == "voco":
                new_tokens, record = self._generate_voco(contexts, images, settings, timer, task)
            else:
                new_tokens, record = self._generate_llava(contexts, images, settings, task)
        record.prefill_s, record.ttft_s = timer.prefill_s, timer.ttft_s
        self.efficiency.add(record)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [self._cut(text, until) for text in texts]

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()

    def _generate_llava(self, contexts, images, settings, task) -> tuple[torch.Tensor, BatchRecord]:
        prompts = [self.prompt(context, len(imgs)) for context, imgs in zip(contexts, images)]
        flat = [image for imgs in images for image in imgs]
        # CDPruner conditions on the question alone, without the answer-format suffix (specs/cdpruner.md §5.1).
        question = ({"instructions": [cdpruner_instruction(context) for context in contexts]}
                    if self.model.config.compression["method"] == "cdpruner" else {})
        inputs = self.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt",
                                **question).to(self._input_device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, **settings)
        image_token_id = getattr(self.model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = self.model.config.image_token_index
        mask = inputs["attention_mask"]
        per_layer = self._kv_bytes_per_token() // self.model.config.text_config.num_hidden_layers
        if self.method == "sparsevlm":
            report = self.model.sparsevlm_report
            record = BatchRecord(task, len(prompts), list(report.equal_tokens),
                                 [sum(lengths) * per_layer for lengths in report.real_kv_lengths],
                                 0.0, 0.0, [list(c) for c in report.layer_counts])
        else:
            tokens = (inputs["input_ids"] == image_token_id).sum(-1).tolist()
            record = BatchRecord(task, len(prompts), [float(t) for t in tokens],
                                 [int(n) * self._kv_bytes_per_token() for n in mask.sum(-1).tolist()], 0.0, 0.0)
        return output[:, inputs["input_ids"].shape[1]:], record

    def _generate_voco(self, contexts, images, settings, timer, task) -> tuple[torch.Tensor, BatchRecord]:
        """VoCo two-stage inference: compress each image into its K VoCo tokens' K/V, then answer the text from them."""
        from ..demo.voco_shapes import pad, voco_prefix
        from ..voco import VOCO_SYSTEM_PROMPT, build_voco_text_prompt

        if any(len(imgs) != 1 for imgs in images):
            raise ValueError(f"VoCo answers one image per sample; got {[len(imgs) for imgs in images]} images per sample")
        prefix = voco_prefix(self.processor, [imgs[0] for imgs in images], self.model.config.voco_token_id)
        prefix = {key: value.to(self._input_device) for key, value in prefix.items()}
        prefix["pixel_values"] = prefix["pixel_values"].to(self.model.dtype)
        cache = timer.timed(self.model.voco_compress, **prefix)
        system = VOCO_SYSTEM_PROMPT if self.system_prompt is None else self.system_prompt
        texts = [self.tokenizer(build_voco_text_prompt(context.replace(self.processor.image_token, "").strip(), system),
                                add_special_tokens=False)["input_ids"] for context in contexts]
        ids = pad(texts, self.tokenizer.pad_token_id, "left").to(self._input_device)
        mask = pad([[1] * len(t) for t in texts], 0, "left").to(self._input_device)
        output = self.model.generate(input_ids=ids, attention_mask=mask, voco_cache=cache, **settings)
        count = self.model.config.compression["num_voco_tokens"]
        record = BatchRecord(task, len(contexts), [float(count)] * len(contexts),
                             [(count + len(t)) * self._kv_bytes_per_token() for t in texts], 0.0, 0.0)
        return output[:, ids.shape[1]:], record

    def _kv_bytes_per_token(self) -> int:
        from ..voco import cache_bytes_per_token

        return cache_bytes_per_token(self.model.config.text_config, self.model.dtype)
