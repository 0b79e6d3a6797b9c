"""Decoders for axiomatic training, one per positional encoding: none, learned, sinusoidal, RoPE.

Vashishtha et al., "Teaching Transformers Causal Reasoning through Axiomatic Training" (arXiv
2407.07612, section 3.2 and the positional-encoding comparison) train a GPT-2-style decoder from
scratch and compare no positional encoding (NoPE), learned absolute (LPE), sinusoidal (SPE) and RoPE.
All four come from stock transformers configs, with no custom modelling code:

- `learned`: `GPT2LMHeadModel`, its `wpe` table trained as usual.
- `sinusoidal`: the same model with `wpe` set to the Vaswani et al. table and frozen.
- `none`: the same model with `wpe` all zeros and frozen: token embeddings only.
- `rope`: `GPTNeoXForCausalLM` with `rotary_pct=1.0`, set up as close to GPT-2 as the config allows
  (sequential residual, `gelu_new`, 4x MLP, tied embeddings); `rotary_pct=0.0` is another NoPE model
  (`neox_config`), used by the tests as a cross-check of `none`.

`architecture="llama"` builds `rope` as a `LlamaForCausalLM` instead (RMSNorm; SwiGLU 8/3 as wide as the
model, the parameters of GPT-2's 4x MLP; tied embeddings): the model `bico.patch_llama` patches, so BICO's denoising can be mixed into the training
(`bico.axioms.denoising`). Its plain-RoPE run is the control.

The frozen tables stay exact: training optimizes only parameters with `requires_grad` (frozen ones get
no gradient, no AdamW step and no weight decay, `bico.training.make_optimizer`), `save_pretrained` writes
them, and `load_model` freezes them again after `from_pretrained` (which makes every parameter
trainable) and checks that they still hold the values they should.

What "none" means for depth. With a causal mask and no positional signal, a one-layer model's output
at the last position is a function of that token and of the *set* of tokens before it (softmax
attention over keys is permutation invariant), so it cannot see order at all. From two layers on it
can: position i attends to i + 1 tokens, so a first layer that attends uniformly writes into position
i a mean over its prefix that depends on i, and the second layer reads order off those means
(Kazemnejad et al. 2023, arXiv 2305.19466, show that NoPE can represent absolute and relative
positions this way). The causal mask is then the only source of order, and the check that holds at
every depth is that the outputs do not depend on `position_ids` at all (`tests/test_axioms_models.py`).

The saved `config.json` records `bico_position_encoding`; evaluation reads it back from there.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
    PreTrainedModel,
)


__all__ = [
    "POSITION_ENCODINGS", "ARCHITECTURES", "build_model", "load_model", "read_position_encoding", "check_vocabulary", "sinusoidal_table",
    "collate", "gather_last", "last_position_logits",
]

POSITION_ENCODINGS = ("none", "learned", "sinusoidal", "rope")
ARCHITECTURES = ("gpt", "llama")  # gpt: GPT-2, or GPT-NeoX for rope (the paper's); llama: rope only
FROZEN_TABLES = ("none", "sinusoidal")  # GPT-2's `wpe` is fixed for these
CONFIG_KEY = "bico_position_encoding"  # in config.json


# --------------------------------------------------------------------------------------------------
# Building, saving and loading
# --------------------------------------------------------------------------------------------------


def check_position_encoding(position_encoding: str) -> None:
    """Raise `ValueError` naming `position_encoding` and listing `POSITION_ENCODINGS` unless it is one."""
    if position_encoding not in POSITION_ENCODINGS:
        raise ValueError(f"`position_encoding` must be one of {', '.join(POSITION_ENCODINGS)}; got {position_encoding!r}.")


def sinusoidal_table(max_positions: int, n_embd: int) -> torch.Tensor:
    """The sinusoidal table of Vaswani et al.: row p is `sin(p / 10000^(2i/d))` at 2i, `cos(...)` at 2i + 1.

    Returns:
        `torch.Tensor` of shape (max_positions, n_embd), float64.
    """
    positions = torch.arange(max_positions, dtype=torch.float64)[:, None]  # (P, 1)
    frequencies = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))  # (ceil(D/2),)
    table = torch.zeros(max_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies[: n_embd // 2])
    return table


def gpt2_config(vocab_size: int, *, n_layer: int, n_head: int, n_embd: int, max_positions: int, pad_token_id: int,
                dropout: float = 0.0) -> GPT2Config:
    """GPT-2 (`learned`, `sinusoidal`, `none`): 4x MLP, `gelu_new`, tied embeddings, one dropout rate."""
    return GPT2Config(
        vocab_size=vocab_size, n_positions=max_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=None, eos_token_id=None, pad_token_id=pad_token_id, use_cache=False,
    )


def neox_config(vocab_size: int, *, n_layer: int, n_head: int, n_embd: int, max_positions: int, pad_token_id: int,
                dropout: float = 0.0, rotary_pct: float = 1.0) -> GPTNeoXConfig:
    """GPT-NeoX as close to GPT-2 as its config goes; `rotary_pct` 1.0 is `rope`, 0.0 a NoPE model."""
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
        intermediate_size=4 * n_embd, hidden_act="gelu_new", max_position_embeddings=max_positions,
        rotary_pct=rotary_pct, use_parallel_residual=False, tie_word_embeddings=True,
        attention_dropout=dropout, hidden_dropout=dropout,
        bos_token_id=None, eos_token_id=None, pad_token_id=pad_token_id, use_cache=False,
    )


def llama_config(vocab_size: int, *, n_layer: int, n_head: int, n_embd: int, max_positions: int, pad_token_id: int,
                 dropout: float = 0.0) -> LlamaConfig:
    """Llama with RoPE at the sizes of `gpt2_config` (`bico.patch_llama` patches it).

    SwiGLU has three matrices where GPT-2's MLP has two, so its width is 8/3 of `n_embd` (rounded up to a
    multiple of 8) and the MLP keeps GPT-2's parameter count; embeddings are tied, as in GPT-2.
    """
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
        num_key_value_heads=n_head, intermediate_size=8 * math.ceil(n_embd / 3), max_position_embeddings=max_positions,
        tie_word_embeddings=True, attention_dropout=dropout,
        bos_token_id=None, eos_token_id=None, pad_token_id=pad_token_id, use_cache=False,
    )


def check_architecture(architecture: str, position_encoding: str) -> None:
    """Raise `ValueError` unless `architecture` is one of `ARCHITECTURES` and can carry `position_encoding`."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"`architecture` must be one of {', '.join(ARCHITECTURES)}; got {architecture!r}.")
    if architecture == "llama" and position_encoding != "rope":
        raise ValueError(f"`architecture` llama has RoPE only; use `position_encoding` rope, not {position_encoding!r}.")


def build_model(position_encoding: str, vocab_size: int, *, n_layer: int, n_head: int, n_embd: int, max_positions: int,
                pad_token_id: int, seed: int, dropout: float = 0.0, architecture: str = "gpt") -> PreTrainedModel:
    """A randomly initialised decoder with the given positional encoding.

    Args:
        position_encoding (`str`): One of `POSITION_ENCODINGS`.
        vocab_size (`int`): `len(tokenizer)`.
        n_layer, n_head, n_embd (`int`): Depth, heads and width (`n_embd` divisible by `n_head`; even for
            `rope` and `sinusoidal`).
        max_positions (`int`): The longest input in tokens; the size of GPT-2's `wpe` table (RoPE has no limit).
        pad_token_id (`int`): The tokenizer's pad id.
        seed (`int`): Seeds the initialisation; the global RNG is left as it was.
        dropout (`float`, *optional*, defaults to 0.0): Every dropout rate of the model.
        architecture (`str`, *optional*, defaults to `"gpt"`): `"gpt"`, or `"llama"` for a `rope` Llama.

    Returns:
        `GPT2LMHeadModel`, `GPTNeoXForCausalLM` or `LlamaForCausalLM` in float32, train mode, with `config.bico_position_encoding`
        set; for `none` and `sinusoidal`, `transformer.wpe.weight` holds the fixed table with `requires_grad=False`.

    Raises:
        `ValueError`: for an unknown `position_encoding` (the message lists the valid ones) or bad sizes.
    """
    check_position_encoding(position_encoding)
    check_architecture(architecture, position_encoding)
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd), ("max_positions", max_positions),
                        ("vocab_size", vocab_size)):
        if value <= 0:
            raise ValueError(f"`{name}` must be positive, got {value}.")
    if n_embd % n_head or (position_encoding == "rope" and (n_embd // n_head) % 2):
        raise ValueError(f"`n_embd` {n_embd} must split into `n_head` {n_head} heads (of even size for rope).")
    sizes = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_positions=max_positions, pad_token_id=pad_token_id, dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "llama":
            model = LlamaForCausalLM(llama_config(vocab_size, **sizes))
        elif position_encoding == "rope":
            model = GPTNeoXForCausalLM(neox_config(vocab_size, rotary_pct=1.0, **sizes))
        else:
            model = GPT2LMHeadModel(gpt2_config(vocab_size, **sizes))
    model.config.bico_position_encoding = position_encoding
    _fix_position_table(model, position_encoding)
    return model


def read_position_encoding(model: PreTrainedModel) -> str:
    """The positional encoding recorded in `model.config` (`bico_position_encoding`)."""
    value = getattr(model.config, CONFIG_KEY, None)
    if value not in POSITION_ENCODINGS:
        raise ValueError(
            f"the model's config.json has no valid `{CONFIG_KEY}` (got {value!r}; expected one of "
            f"{', '.join(POSITION_ENCODINGS)}): not a model saved by `bico-axioms train`."
        )
    return value


def load_model(model_dir: str | os.PathLike) -> PreTrainedModel:
    """Load a model saved by `save_pretrained`, freeze its fixed position table again and check it.

    `AutoModelForCausalLM.from_pretrained` makes every parameter trainable; this puts
    `requires_grad=False` back on the `wpe` table of `none` and `sinusoidal` models, and raises
    `ValueError` if that table no longer holds zeros / the sinusoidal values (a model trained without
    the freeze). Returns the model in eval mode, float32.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"`model` {str(model_dir)!r} is not a model directory (no config.json); pass a directory written by `bico-axioms train`.")
    config = AutoConfig.from_pretrained(model_dir)
    rope = json.loads((model_dir / "config.json").read_text()).get("rope_parameters") or {}
    if config.model_type == "gpt_neox" and "partial_rotary_factor" in rope:
        # transformers 5.0 resets the saved factor to GPT-NeoX's default 0.25 on load; 5.24+ keep it.
        config.rope_parameters["partial_rotary_factor"] = rope["partial_rotary_factor"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config)
    encoding = read_position_encoding(model)
    if encoding in FROZEN_TABLES:
        wpe = model.transformer.wpe.weight
        expected = _position_table(encoding, *wpe.shape).to(wpe.dtype)
        if not torch.equal(wpe.detach().cpu(), expected):
            difference = (wpe.detach().cpu().double() - expected.double()).abs().max().item()
            raise ValueError(f"{model_dir}: the frozen `{encoding}` position table differs from its fixed values (max {difference:.3g}).")
        wpe.requires_grad_(False)
    return model.eval()


def check_vocabulary(model: PreTrainedModel, tokenizer) -> None:
    """Raise a one-line `ValueError` if `tokenizer` does not fit `model` (vocabulary size or pad id)."""
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {model.config.vocab_size} "
            "(config.json vocab_size): use the tokenizer saved next to the model."
        )
    if tokenizer.pad_token_id != model.config.pad_token_id:
        raise ValueError(
            f"the tokenizer's pad id {tokenizer.pad_token_id} differs from the model's {model.config.pad_token_id}: "
            "use the tokenizer saved next to the model."
        )


def _position_table(encoding: str, max_positions: int, n_embd: int) -> torch.Tensor:
    if encoding == "sinusoidal":
        return sinusoidal_table(max_positions, n_embd)
    return torch.zeros(max_positions, n_embd, dtype=torch.float64)


def _fix_position_table(model: PreTrainedModel, encoding: str) -> None:
    if encoding not in FROZEN_TABLES:
        return
    wpe = model.transformer.wpe.weight
    with torch.no_grad():
        wpe.copy_(_position_table(encoding, *wpe.shape))
    wpe.requires_grad_(False)  # bico: a fixed table, never trained


# --------------------------------------------------------------------------------------------------
# Batches and the answer position
# --------------------------------------------------------------------------------------------------


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded instances (`bico.axioms.tokenizer.encode`) into a batch.

    Args:
        examples (`list[dict]`): Each with `input_ids` (`list[int]`, ending with the `?` token) and
            `label` (the Yes or No token id).
        pad_token_id (`int`): Fills the positions after each row's end.

    Returns:
        `dict`: `input_ids` and `attention_mask` (B, L) int64 (1 on real tokens, then 0s), and
        `answer_ids` (B,) int64, the token each row should predict after its last real position.
    """
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    for i, example in enumerate(examples):
        input_ids[i, : len(example["input_ids"])] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[i, : len(example["input_ids"])] = 1
    answer_ids = torch.tensor([example["label"] for example in examples], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_ids": answer_ids}


def last_position_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits at each row's last real position (right padding), where the answer is read.

    Args:
        model: A causal LM (possibly wrapped by DDP).
        input_ids, attention_mask (`torch.Tensor` of shape (B, L)): A right-padded batch (`collate`); every
            row has at least one real token.

    Returns:
        `torch.Tensor` of shape (B, V), in the logits' dtype.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, L, V)
    return gather_last(logits, attention_mask)


def gather_last(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its last real position: (B, L, V) and a right-padded (B, L) mask -> (B, V)."""
    last = attention_mask.sum(dim=1) - 1  # (B,)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]
