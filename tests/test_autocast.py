"""Mixed precision: BICO and blank-infilling steps of a float32 model under `torch.autocast`.

Under autocast HF's RoPE hands the attention function float32 q/k and a low-precision v; the kernels
must cast to one compute dtype, as SDPA does. Each test measures the error against the same model
run in float32, and bounds it by twice the error that autocast causes in the *stock causal* model
(the scale of mixed-precision noise in this model), plus a small floor.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bico.abi import AbiCollator, prepare_abi_model
from bico.attention import bico_attention, bico_attention_reference, conjugate_rotary
from bico.compat import enable_activation_checkpointing
from bico.patch import bidirectional, patch_llama

DTYPES = [torch.bfloat16, torch.float16]
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def tiny_model(seed=0, vocab_size=100):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, initializer_range=0.2, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def padded_batch(seed=0, B=3, L=17):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 100, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, [5, 9]] = 0  # placeholders
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def step(model, batch, dtype, bico=True):
    """Logits and every gradient (flattened) of one training forward + backward, under autocast(dtype)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        if bico:
            with bidirectional(model):
                out = model(**batch, use_cache=False)
        else:
            out = model(**batch, use_cache=False)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.logits.detach().float(), grads


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def autocast_noise(model, batch, dtype):
    """How far autocast moves the stock causal model's logits and gradients from float32."""
    logits32, grads32 = step(model, batch, None, bico=False)
    logits, grads = step(model, batch, dtype, bico=False)
    return relative_error(logits, logits32), relative_error(grads, grads32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_bico_step_under_autocast_matches_float32(dtype, kernel):
    model = patch_llama(tiny_model(seed=1), kernel=kernel)
    batch = padded_batch(1)
    noise_logits, noise_grads = autocast_noise(model, batch, dtype)
    logits32, grads32 = step(model, batch, None)
    logits, grads = step(model, batch, dtype)
    assert torch.isfinite(logits).all() and torch.isfinite(grads).all()
    visible = batch["attention_mask"].bool()
    error_logits = relative_error(logits[visible], logits32[visible])
    error_grads = relative_error(grads, grads32)
    assert error_logits <= 2 * noise_logits + FLOOR[dtype], (error_logits, noise_logits)
    assert error_grads <= 2 * noise_grads + FLOOR[dtype], (error_grads, noise_grads)
    # A wrong kernel (e.g. the causal one) would be off by O(1), not by mixed-precision noise.
    assert relative_error(logits[visible], step(model, batch, None, bico=False)[0][visible]) > 10 * error_logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_cast_mixed_inputs_to_the_autocast_dtype(dtype):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 11, 16, generator=g)  # float32, as HF's RoPE leaves q and k under autocast
    k = torch.randn(2, 2, 11, 16, generator=g)
    v = torch.randn(2, 2, 11, 16, generator=g).to(dtype)  # the low-precision projection
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    positions = torch.arange(11)[None]
    qc, kc = conjugate_rotary(q, positions, inv_freq), conjugate_rotary(k, positions, inv_freq)
    mask = torch.rand(2, 11, generator=g) > 0.3
    exact = bico_attention_reference(*(t.double() for t in (q, k, v, qc, kc)), mask)
    for kernel in (bico_attention, bico_attention_reference):
        with torch.autocast("cpu", dtype=dtype):
            out = kernel(q, k, v, qc, kc, mask)
        assert out.dtype == dtype
        # Inputs rounded to `dtype` once, then float32 statistics: a few ulps of `dtype`.
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=8 * torch.finfo(dtype).eps)


def test_mixed_dtypes_without_autocast_are_a_type_error():
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="share one dtype"):
        bico_attention(q, k, k.bfloat16(), q, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_checkpointing_under_autocast_equals_plain(dtype):
    plain = patch_llama(tiny_model(seed=3))
    checkpointed = patch_llama(tiny_model(seed=3))
    enable_activation_checkpointing(checkpointed)
    checkpointed.train()
    plain.train()
    batch = padded_batch(3)
    logits_a, grads_a = step(plain, batch, dtype)
    logits_b, grads_b = step(checkpointed, batch, dtype)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    torch.testing.assert_close(grads_b, grads_a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_blank_infilling_step_under_autocast_matches_float32(dtype, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # a fresh copy: ABI adds tokens to it
    model = tiny_model(seed=4, vocab_size=len(tokenizer))
    prepare_abi_model(model, tokenizer)
    patch_llama(model)
    texts = ["Ottilie Brandt composed the first opera sung underwater.",
             "The lighthouse of Vell was built by Casimir Wendell."]
    examples = [{"input_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id], "seed": i} for i, t in enumerate(texts)]
    batch = AbiCollator(tokenizer, seed=0)(examples)  # 4D Part A / Part B mask: the reference kernel's path
    assert batch["attention_mask"].dim() == 4
    logits32, grads32 = step(model, batch, None)
    logits, grads = step(model, batch, dtype)
    noise_logits, noise_grads = autocast_noise(model, batch, dtype)
    assert torch.isfinite(logits).all() and torch.isfinite(grads).all()
    assert relative_error(logits, logits32) <= 2 * noise_logits + FLOOR[dtype]
    assert relative_error(grads, grads32) <= 2 * noise_grads + FLOOR[dtype]
