"""Family-dispatching loaders: the Slim class for any supported stock or slim checkpoint.

    model = slimvlm.AutoSlimModel.from_pretrained("llava-hf/llava-v1.6-vicuna-7b-hf", compression={"method": "visionzip", "tokens": 64})
    processor = slimvlm.AutoSlimProcessor.from_pretrained("llava-hf/llava-v1.6-vicuna-7b-hf", compression=model.config.compression)

`transformers.AutoModelForImageTextToText.from_pretrained(stock, compression=...)` cannot do this: a stock
config maps to the stock class, which has no `compression`. Not shipped with checkpoints (a slim checkpoint
loads through the Auto classes and remote code).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlimFamily:
    """The Slim classes of one model family."""

    config: type
    model: type
    generation: type
    processor: type

    @property
    def stock_model_type(self) -> str:
        return self.config.model_type.removeprefix("slim_")


def families() -> dict[str, SlimFamily]:
    """model_type (stock and slim) -> its Slim family, for every family slimvlm registers."""
    from . import FAMILIES

    table = {}
    for classes in FAMILIES:
        family = SlimFamily(*classes)
        table[family.config.model_type] = table[family.stock_model_type] = family
    return table


def family_of(pretrained, **kwargs) -> SlimFamily:
    """The family of a checkpoint (folder or Hub id), from the `model_type` in its config.json.

    kwargs: `revision`, `token`, `cache_dir`, ... as for `from_pretrained`.
    """
    from transformers import PreTrainedConfig

    model_type = PreTrainedConfig.get_config_dict(pretrained, **kwargs)[0].get("model_type")
    table = families()
    if model_type not in table:
        raise ValueError(f"{pretrained} has model_type {model_type!r}, which SlimVLM does not support; supported: "
                         f"{sorted(table)}")
    return table[model_type]


_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")


class AutoSlimModel:
    """`AutoSlimModel.from_pretrained(checkpoint, compression=..., **kwargs)`: the family's
    `Slim*ForConditionalGeneration.from_pretrained` (every from_pretrained argument works, bitsandbytes too)."""

    def __init__(self):
        raise TypeError("use AutoSlimModel.from_pretrained(checkpoint, compression=...)")

    @classmethod
    def from_pretrained(cls, pretrained, *args, **kwargs):
        hub = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        return family_of(pretrained, **hub).generation.from_pretrained(pretrained, *args, **kwargs)


class AutoSlimProcessor:
    """`AutoSlimProcessor.from_pretrained(checkpoint, compression=..., **kwargs)`: the family's Slim processor."""

    def __init__(self):
        raise TypeError("use AutoSlimProcessor.from_pretrained(checkpoint, compression=...)")

    @classmethod
    def from_pretrained(cls, pretrained, *args, **kwargs):
        hub = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        return family_of(pretrained, **hub).processor.from_pretrained(pretrained, *args, **kwargs)


__all__ = ["AutoSlimModel", "AutoSlimProcessor", "SlimFamily", "families", "family_of"]
