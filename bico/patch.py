"""The Hugging Face patch: bidirectional-RoPE attention for Llama-family models, switched per forward.

BICO (Lv et al., arXiv 2311.07468, section 4) trains a causal LM with bidirectional attention whose
look-ahead keys use the conjugate rotary rotation. This module plugs the kernels of
`bico.attention` into stock transformers (5.x) through its public extension points, without
copying any modeling code:

    * an attention function registered in `AttentionInterface` and a mask function registered in
      `AttentionMaskInterface` under one name (`bico_fused` or `bico_reference`);
    * `patch_llama(model)` switches the model to that name. Outside `bidirectional(model)` both
      functions hand every call, unchanged, to the implementation the model had before (sdpa,
      eager, flash...), so the patched model is the same causal model, bit for bit.
    * inside `with bidirectional(model):` the mask function returns the (B, L) key mask (padding
      and placeholders) and a forward pre-hook tags the decoder's kwargs with `bico_bidirectional`,
      which reaches the attention function and survives gradient-checkpointing recomputation
      (the recompute replays the kwargs even after the context has closed).

Works for `LlamaForCausalLM`, `LlamaModel`, peft-wrapped models, and the same-RoPE families
Mistral and Qwen2.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import bico_attention, bico_attention_reference, conjugate_rotary

KERNELS = ("fused", "reference")
# Rope types with a fixed rotation per position. "dynamic" and "longrope" change the frequencies
# with the sequence length, so a rotated vector cannot be conjugated from the position alone.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FLAG = "bico_bidirectional"
CACHE_KWARGS = ("cache", "past_key_values")  # the decoder's KV-cache argument: 5.24+ name, older name

_KV_CACHE_ERROR = (
    "incremental decoding with a KV cache is not supported in bidirectional mode; "
    "generate outside `bico.bidirectional(model)` (inference uses the causal model)."
)

_ACTIVE: Counter[int] = Counter()  # id(config) -> open `bidirectional` contexts
_INV_FREQ_CACHE: dict[tuple, torch.Tensor] = {}


def _decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns the rotary embedding and the layers (e.g. `LlamaModel`), through any wrapper."""
    for module in model.modules():
        if hasattr(module, "rotary_emb") and hasattr(module, "layers") and hasattr(module, "config"):
            return module
    raise TypeError(
        f"`model` ({type(model).__name__}) has no decoder with rotary embeddings (`rotary_emb`); "
        "bico supports Llama-family models (Llama, Mistral, Qwen2)."
    )


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_type", "default")


def _inv_freq(config, device: torch.device) -> torch.Tensor:
    """The rotary inverse frequencies of `config`, computed once per (rope setting, device)."""
    params = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    key = (repr(sorted(params.items())), head_dim, str(device))
    if key not in _INV_FREQ_CACHE:
        rope_type = _rope_type(config)
        if rope_type == "default":
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            exponent = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim
            inv_freq = 1.0 / (params["rope_theta"] ** exponent)
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        _INV_FREQ_CACHE[key] = inv_freq
    return _INV_FREQ_CACHE[key]


def _base_attention(module: nn.Module, base: str):
    if base == "eager":
        # The eager function lives in each modeling file; the module's own is the one to call.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_functions(kernel: str, base: str):
    """Build the (attention, mask) pair registered for one (kernel, base implementation)."""

    def mask_function(*args, config=None, attention_mask=None, batch_size=None, kv_length=None, device=None, **kwargs):
        if _ACTIVE[id(config)] == 0:
            base_mask = ALL_MASK_ATTENTION_FUNCTIONS[base]
            return base_mask(
                *args, config=config, attention_mask=attention_mask, batch_size=batch_size,
                kv_length=kv_length, device=device, **kwargs,
            )
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and kv_length > window:
            raise ValueError(
                f"sequence length {kv_length} exceeds `sliding_window`={window}; bidirectional mode "
                "attends to the whole sequence, so use sequences within the window."
            )
        if attention_mask is None:
            return torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        return attention_mask.bool()  # (B, L) key mask: 0 at padding and placeholders

    def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not kwargs.pop(FLAG, False):
            return _base_attention(module, base)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if dropout > 0.0:
            raise ValueError(
                f"attention dropout ({dropout}) is not supported in bidirectional mode; set "
                "`config.attention_dropout = 0.0` (the BICO recipe uses none)."
            )
        if key.shape[2] != query.shape[2]:
            raise ValueError(_KV_CACHE_ERROR)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(query.shape[2], device=query.device)[None]
        inv_freq = _inv_freq(module.config, query.device)
        query_conj = conjugate_rotary(query, position_ids, inv_freq)  # bico: look-ahead keys use R(m - n)
        key_conj = conjugate_rotary(key, position_ids, inv_freq)
        if attention_mask is not None and attention_mask.dim() == 4:
            # A full pairwise mask (blank infilling): conjugate wherever the key's position is ahead.
            if attention_mask.dtype != torch.bool:
                attention_mask = attention_mask == 0  # additive float mask: 0 = may attend
            positions = position_ids.expand(query.shape[0], -1)
            conjugate = (positions[:, None, None, :] > positions[:, None, :, None])  # (B, 1, L, L)
            out = bico_attention_reference(
                query, key, value, query_conj, key_conj, None, scaling, attn_mask=attention_mask, conjugate=conjugate
            )
        else:
            attend = bico_attention if kernel == "fused" else bico_attention_reference
            out = attend(query, key, value, query_conj, key_conj, attention_mask, scaling)
        return out, None

    return attention_function, mask_function


def _implementation_name(kernel: str, base: str) -> str:
    # Keep "flash_attention" out of the name: transformers treats such names specially.
    return f"bico_{kernel}" if base == "sdpa" else f"bico_{kernel}_over_{base.replace('flash_attention', 'fa')}"


_BASES: dict[str, tuple[str, str]] = {}  # registered name -> (kernel, base implementation)


def _add_flag(module, args, kwargs):
    if _ACTIVE[id(module.config)]:
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name stays an alias until
        # 5.40). Refuse before any layer runs, so the caller's cache is left as it was.
        for name in CACHE_KWARGS:
            past = kwargs.get(name)
            if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
                raise ValueError(_KV_CACHE_ERROR)
        kwargs[FLAG] = True
    return args, kwargs


def is_patched(model: nn.Module) -> bool:
    """Whether `patch_llama` has been applied to `model` (or to the model inside its wrapper)."""
    return _decoder_stack(model).config._attn_implementation in _BASES


def patch_llama(model: nn.Module, kernel: str = "fused") -> nn.Module:
    """Make a Llama-family model able to run bidirectional-RoPE attention inside `bidirectional(model)`.

    Outside that context the model computes exactly what it computed before. Patching twice is
    harmless (a second call may switch `kernel`).

    Args:
        model (`nn.Module`): a `LlamaForCausalLM`, `LlamaModel`, Mistral/Qwen2 equivalent, or a peft
            wrapper of one. Modified in place.
        kernel (`str`, *optional*, defaults to `"fused"`): `"fused"` (split + log-sum-exp merge, no
            L x L matrix) or `"reference"` (both score matrices; for checking).

    Returns:
        The same `model`.

    Raises:
        TypeError: the model has no rotary embeddings.
        ValueError: an unknown `kernel`, or a rope type whose rotation cannot be conjugated.
    """
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")
    stack = _decoder_stack(model)
    config = stack.config
    rope_type = _rope_type(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} changes its frequencies with the sequence length, so its rotation cannot be "
            f"conjugated per position; supported rope types: {SUPPORTED_ROPE_TYPES}."
        )
    current = config._attn_implementation
    base = _BASES[current][1] if current in _BASES else current
    name = _implementation_name(kernel, base)
    if name not in _BASES:
        attention_function, mask_function = _make_functions(kernel, base)
        AttentionInterface.register(name, attention_function)
        AttentionMaskInterface.register(name, mask_function)
        _BASES[name] = (kernel, base)
    stack.set_attn_implementation(name)
    if getattr(stack, "_bico_hook", None) is None:
        stack._bico_hook = stack.register_forward_pre_hook(_add_flag, with_kwargs=True)
    return model


def unpatch_llama(model: nn.Module) -> nn.Module:
    """Undo `patch_llama`: restore the previous attention implementation and remove the hook."""
    stack = _decoder_stack(model)
    current = stack.config._attn_implementation
    if current in _BASES:
        stack.set_attn_implementation(_BASES[current][1])
    hook = getattr(stack, "_bico_hook", None)
    if hook is not None:
        hook.remove()
        stack._bico_hook = None
    return model


@contextlib.contextmanager
def bidirectional(model: nn.Module) -> Iterator[nn.Module]:
    """Run the forwards inside this block with bidirectional-RoPE attention (BICO mode).

    Every key whose `attention_mask` is 0 (padding or a placeholder) is hidden from every query.
    A 4D `attention_mask` (B, 1, L, L) is honoured as given, with the conjugate rotation wherever the
    key's position id exceeds the query's. Backward passes may run after the block ends, also with
    gradient checkpointing. Generation with a KV cache is refused inside the block.

    Example:
        >>> with bico.bidirectional(model):
        ...     loss = model(**batch, use_cache=False).loss
        >>> loss.backward()
    """
    stack = _decoder_stack(model)
    if not is_patched(model):
        raise ValueError("`model` is not patched; call `bico.patch_llama(model)` before `bico.bidirectional(model)`.")
    key = id(stack.config)
    _ACTIVE[key] += 1
    try:
        yield model
    finally:
        _ACTIVE[key] -= 1
        if _ACTIVE[key] <= 0:
            del _ACTIVE[key]
