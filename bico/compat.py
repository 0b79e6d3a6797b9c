"""transformers release differences, in one place: the KV-cache argument and activation checkpointing.

bico supports transformers 5.0 to the newest 5.x (see pyproject.toml). Two renames inside that range
reach the project's own calls:

    * 5.24 renamed the decoder's `past_key_values` argument (and the output field) to `cache`; the
      old name is a deprecated alias until 5.40.
    * later 5.x releases renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`.

Everything else uses names that are the same across the range.
"""

from __future__ import annotations

import inspect

from transformers import LlamaModel


def _forward_accepts(name: str) -> bool:
    return name in inspect.signature(LlamaModel.forward).parameters


# The KV-cache keyword of the installed transformers' decoders (and of their outputs).
CACHE_KWARG = "cache" if _forward_accepts("cache") else "past_key_values"


def output_cache(outputs):
    """The KV cache of a model output, read under the installed release's field name."""
    return getattr(outputs, CACHE_KWARG)


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing with the installed release's method.

    Args:
        model (`PreTrainedModel`): The model, before any peft wrapping.
        use_reentrant (`bool`, *optional*, defaults to `False`): Non-reentrant works with frozen
            embeddings (LoRA); BICO mode is replayed by the recomputation either way (bico.patch).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
