"""Tests for `bico.patch` on tiny Llama / Mistral / Qwen2 models built from configs.

Exactness checks run float64 models. Weights are initialised with std 0.2 (not HF's 0.02) so that
attention is far from uniform and a wrong rotation or mask changes outputs by much more than the
tolerances used here.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bico.compat import CACHE_KWARG, output_cache
from bico.patch import CACHE_KWARGS, bidirectional, is_patched, patch_llama, unpatch_llama

VOCAB = 100
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    initializer_range=0.2,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(seed=0, family="llama", dtype=torch.float64, attn="sdpa", model_cls=None, **overrides):
    """A random tiny model in eval mode; `overrides` go to the config."""
    config_cls, default_cls = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides}, attn_implementation=attn)
    torch.manual_seed(seed)
    model = (model_cls or default_cls)(config)
    return model.to(dtype).eval()


def batch(seed=0, B=2, L=9):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (B, L), generator=g)
    return input_ids, torch.ones(B, L, dtype=torch.long)


def left_padded(seed=0):
    """Rows of real lengths 9, 6, 3 left-padded to 9, with HF-style (B, L) position ids."""
    input_ids, _ = batch(seed, B=3, L=9)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, :3] = 0
    attention_mask[2, :6] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def logits(model, input_ids, attention_mask=None, **kwargs):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def bico_logits(model, *args, **kwargs):
    with bidirectional(model):
        return logits(model, *args, **kwargs)


def loss_and_grads(model, input_ids, attention_mask, params=None, bico=True, **kwargs):
    """Causal-LM loss with labels = inputs (masked positions ignored) and gradients of `params`."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    if bico:
        with bidirectional(model):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()  # after the context has closed, as a training loop may do
    return out.logits.detach(), [p.grad.detach().clone() for p in params]


def assert_all_close(a_list, b_list, atol):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Outside `bidirectional`: the unchanged causal model, bit for bit.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patch_off_outputs_bit_identical(attn):
    plain = tiny_model(seed=1, dtype=torch.float32, attn=attn)
    patched = tiny_model(seed=1, dtype=torch.float32, attn=attn)
    input_ids, attention_mask, position_ids = left_padded(1)
    expected = logits(plain, input_ids, attention_mask, position_ids=position_ids)
    expected_no_mask = logits(plain, input_ids)

    patch_llama(patched)
    assert is_patched(patched)
    assert torch.equal(logits(patched, input_ids, attention_mask, position_ids=position_ids), expected)
    assert torch.equal(logits(patched, input_ids), expected_no_mask)
    # After a bidirectional forward, the context has closed: causal again.
    bico_out = bico_logits(patched, input_ids, attention_mask, position_ids=position_ids)
    assert max_diff(bico_out, expected) > 1e-3
    assert torch.equal(logits(patched, input_ids, attention_mask, position_ids=position_ids), expected)

    unpatch_llama(patched)
    assert not is_patched(patched)
    assert patched.config._attn_implementation == attn
    assert torch.equal(logits(patched, input_ids, attention_mask, position_ids=position_ids), expected)
    assert torch.equal(logits(patched, input_ids), expected_no_mask)
    with pytest.raises(ValueError, match="not patched"):
        with bidirectional(patched):
            pass


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patch_off_training_gradients_bit_identical(attn):
    plain = tiny_model(seed=2, dtype=torch.float32, attn=attn).train()
    patched = patch_llama(tiny_model(seed=2, dtype=torch.float32, attn=attn).train())
    input_ids, attention_mask, position_ids = left_padded(2)
    want_logits, want = loss_and_grads(plain, input_ids, attention_mask, bico=False, position_ids=position_ids)
    got_logits, got = loss_and_grads(patched, input_ids, attention_mask, bico=False, position_ids=position_ids)
    assert torch.equal(got_logits, want_logits)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_patch_twice_is_harmless_and_can_switch_kernel():
    model = tiny_model(seed=3)
    input_ids, attention_mask = batch(3)
    attention_mask[0, 4] = 0
    causal = logits(model, input_ids, attention_mask)

    patch_llama(model)
    once = bico_logits(model, input_ids, attention_mask)
    hooks = len(model.model._forward_pre_hooks)
    patch_llama(model)
    assert len(model.model._forward_pre_hooks) == hooks
    assert torch.equal(bico_logits(model, input_ids, attention_mask), once)
    assert torch.equal(logits(model, input_ids, attention_mask), causal)

    patch_llama(model, kernel="reference")
    torch.testing.assert_close(bico_logits(model, input_ids, attention_mask), once, rtol=0, atol=1e-10)

    unpatch_llama(model)  # one unpatch undoes any number of patches
    assert model.config._attn_implementation == "sdpa"
    assert len(model.model._forward_pre_hooks) == hooks - 1
    assert torch.equal(logits(model, input_ids, attention_mask), causal)
    unpatch_llama(model)  # and unpatching an unpatched model is a no-op
    assert torch.equal(logits(model, input_ids, attention_mask), causal)


def test_default_implementation_and_save_pretrained_of_a_patched_model(tmp_path):
    """A config without `attn_implementation` patches and unpatches cleanly, and a patched model
    saves as a plain checkpoint that loads back as the stock model."""
    torch.manual_seed(29)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    input_ids, attention_mask = batch(29)
    causal = logits(model, input_ids, attention_mask)
    patch_llama(model)
    assert torch.equal(logits(model, input_ids, attention_mask), causal)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert not is_patched(loaded)
    assert torch.equal(logits(loaded, input_ids, attention_mask), causal)
    unpatch_llama(model)
    assert torch.equal(logits(model, input_ids, attention_mask), causal)


def test_mode_is_per_model_nested_and_exception_safe():
    a = patch_llama(tiny_model(seed=4))
    b = patch_llama(tiny_model(seed=5))
    input_ids, attention_mask = batch(4)
    causal_a, causal_b = logits(a, input_ids, attention_mask), logits(b, input_ids, attention_mask)
    bico_a = bico_logits(a, input_ids, attention_mask)

    with bidirectional(a):
        assert torch.equal(logits(b, input_ids, attention_mask), causal_b)  # b is untouched
        with bidirectional(a):
            pass
        assert torch.equal(logits(a, input_ids, attention_mask), bico_a)  # still on after the inner block
    assert torch.equal(logits(a, input_ids, attention_mask), causal_a)

    with pytest.raises(RuntimeError, match="boom"):
        with bidirectional(a):
            raise RuntimeError("boom")
    assert torch.equal(logits(a, input_ids, attention_mask), causal_a)


# ----------------------------------------------------------------------------------------------
# Inside `bidirectional`: what attention sees.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_later_token_changes_earlier_outputs_only_in_bico_mode(kernel):
    model = patch_llama(tiny_model(seed=6), kernel=kernel)
    input_ids, attention_mask = batch(6)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB

    before, after = bico_logits(model, input_ids, attention_mask), bico_logits(model, changed, attention_mask)
    for i in range(input_ids.shape[1] - 1):
        assert max_diff(before[:, i], after[:, i]) > 1e-4, f"position {i} does not see the last token"

    before, after = logits(model, input_ids, attention_mask), logits(model, changed, attention_mask)
    torch.testing.assert_close(before[:, :-1], after[:, :-1], rtol=0, atol=1e-12)
    assert max_diff(before[:, -1], after[:, -1]) > 1e-4


@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("placeholders", [[4], [0, 5], [0], [8]])
def test_placeholder_token_changes_nothing_elsewhere(kernel, placeholders):
    model = patch_llama(tiny_model(seed=7), kernel=kernel)
    input_ids, attention_mask = batch(7)
    attention_mask[:, placeholders] = 0
    changed = input_ids.clone()
    changed[:, placeholders] = (changed[:, placeholders] + 17) % VOCAB
    others = [i for i in range(input_ids.shape[1]) if i not in placeholders]

    before, after = bico_logits(model, input_ids, attention_mask), bico_logits(model, changed, attention_mask)
    torch.testing.assert_close(before[:, others], after[:, others], rtol=0, atol=1e-12)
    # Control: the same change at a visible position reaches every other position.
    visible = others[len(others) // 2]
    changed_visible = input_ids.clone()
    changed_visible[:, visible] = (changed_visible[:, visible] + 17) % VOCAB
    moved = bico_logits(model, changed_visible, attention_mask)
    for i in others:
        if i != visible:
            assert max_diff(before[:, i], moved[:, i]) > 1e-5


def brute_force_attention(module, hidden, positions, key_mask, inv_freq, attention_scaling=1.0, pairwise=None):
    """One attention layer of a Llama-family model, BICO mode, written out pair by pair in float64.

    Key n <= query m: q_m^T R(p_n - p_m) k_n; key n > m: q_m^T R(p_m - p_n) k_n, where R(a) rotates
    each pair (x_i, x_{i + D/2}) by a * inv_freq[i]; q and k are both scaled by `attention_scaling`
    (YaRN). Hidden keys are skipped; no-key rows give 0. With a `pairwise` (B, 1, L, L) bool mask
    (True = may attend) the key is "ahead" when its position id exceeds the query's, not its index.
    """
    config = module.config
    B, L, _ = hidden.shape
    H, H_kv = config.num_attention_heads, config.num_key_value_heads
    D = config.hidden_size // H
    q = module.q_proj(hidden).view(B, L, H, D)
    k = module.k_proj(hidden).view(B, L, H_kv, D).repeat_interleave(H // H_kv, dim=2)  # (B, L, H, D)
    v = module.v_proj(hidden).view(B, L, H_kv, D).repeat_interleave(H // H_kv, dim=2)
    p = positions.expand(B, L).double()
    ahead = torch.ones(L, L, dtype=torch.bool).triu(1)  # [m, n]: key index n > query index m
    if pairwise is not None:
        ahead = p[:, None, :] > p[:, :, None]  # (B, L, L): key position > query position
    rel = torch.where(ahead, p[:, :, None] - p[:, None, :], p[:, None, :] - p[:, :, None])  # (B, L, L)
    angle = rel[..., None] * inv_freq  # (B, L, L, D/2)
    c, s = angle.cos()[:, None], angle.sin()[:, None]  # (B, 1, L, L, D/2)
    half = D // 2
    q_t, k_t = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, L, D)
    qa, qb = q_t[..., :half][:, :, :, None, :], q_t[..., half:][:, :, :, None, :]  # (B, H, L, 1, D/2)
    ka, kb = k_t[..., :half][:, :, None, :, :], k_t[..., half:][:, :, None, :, :]  # (B, H, 1, L, D/2)
    # q^T R(a) k for R(a) = [[cos, -sin], [sin, cos]] on each pair.
    scores = (qa * (ka * c - kb * s) + qb * (ka * s + kb * c)).sum(-1)  # (B, H, L, L)
    scores = scores * module.scaling * attention_scaling**2
    allowed = key_mask.bool()[:, None, None, :].expand_as(scores)
    if pairwise is not None:
        allowed = allowed & pairwise.expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    weights = (scores - top).exp()
    probs = weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)
    out = probs @ v.transpose(1, 2)  # (B, H, L, D)
    return module.o_proj(out.transpose(1, 2).reshape(B, L, H * D))


def capture_attention_layers(model, *args, **kwargs):
    """Run a BICO-mode forward; return (module, input hidden states, output) for every attention layer."""
    captured = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((module, hidden.detach(), output[0].detach()))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        bico_logits(model, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) == model.config.num_hidden_layers
    return captured


ROPE_CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16, "rope_theta": 500000.0,
            }
        },
    ),
    "yarn": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0,
            }
        },
    ),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_every_attention_layer_matches_brute_force(case):
    """Capture each attention layer's input in BICO mode and recompute it from scratch.

    The frequencies are the model's own (`rotary_emb.inv_freq`, `attention_scaling`), so scaled
    rope types are covered. The model computes its cos / sin in float32 (even in a float64 model),
    so agreement is to ~1e-7, not 1e-12; a wrong rotation, mask or position is off by far more.
    """
    family, overrides = ROPE_CASES[case]
    model = patch_llama(tiny_model(seed=8, family=family, **overrides))
    input_ids, attention_mask, position_ids = left_padded(8)
    attention_mask[0, [0, 4]] = 0  # placeholders, one at position 0
    captured = capture_attention_layers(model, input_ids, attention_mask, position_ids=position_ids)
    rotary = model.model.rotary_emb
    inv_freq, attention_scaling = rotary.inv_freq.double(), rotary.attention_scaling
    if case == "yarn":
        assert attention_scaling > 1.0  # the test does exercise the scaled rotation
    for module, hidden, output in captured:
        with torch.no_grad():
            args = (module, hidden)
            expected = brute_force_attention(*args, position_ids, attention_mask, inv_freq, attention_scaling)
            no_rotation = brute_force_attention(*args, position_ids, attention_mask, inv_freq * 0, attention_scaling)
            ordinary_ahead = brute_force_attention(*args, -position_ids, attention_mask, inv_freq, attention_scaling)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
        assert max_diff(output, no_rotation) > 1e-3  # the rotation matters at this scale
        assert max_diff(output, ordinary_ahead) > 1e-3  # and so does its direction


def test_fused_equals_reference_model_outputs_and_gradients():
    model = patch_llama(tiny_model(seed=9)).train()
    input_ids, attention_mask, position_ids = left_padded(9)
    attention_mask[0, [2, 6]] = 0
    fused_logits, fused_grads = loss_and_grads(model, input_ids, attention_mask, position_ids=position_ids)
    patch_llama(model, kernel="reference")
    ref_logits, ref_grads = loss_and_grads(model, input_ids, attention_mask, position_ids=position_ids)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0, atol=1e-10)
    assert_all_close(fused_grads, ref_grads, atol=1e-10)
    # Control: the BICO gradients are not the causal ones.
    _, causal_grads = loss_and_grads(model, input_ids, attention_mask, bico=False, position_ids=position_ids)
    assert max(max_diff(a, b) for a, b in zip(fused_grads, causal_grads)) > 1e-4


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_left_padding_with_batch_position_ids_equals_unpadded_rows(kernel):
    model = patch_llama(tiny_model(seed=10), kernel=kernel)
    input_ids, attention_mask, position_ids = left_padded(10)
    padded = bico_logits(model, input_ids, attention_mask, position_ids=position_ids)
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        alone = bico_logits(model, input_ids[row : row + 1, real])
        torch.testing.assert_close(padded[row : row + 1, real], alone, rtol=0, atol=1e-10)
    # A uniform shift of a row's positions changes nothing (relative positions only; the model's
    # float32 cos / sin allow ~1e-6), so the default positions, which count the padding, agree too.
    shifted = bico_logits(model, input_ids, attention_mask)
    torch.testing.assert_close(shifted[attention_mask.bool()], padded[attention_mask.bool()], rtol=0, atol=1e-5)
    # Control: the (B, L) positions are really used per row: a gap in row 2 changes row 2 only.
    gapped = position_ids.clone()
    gapped[2, 7:] += 3
    moved = bico_logits(model, input_ids, attention_mask, position_ids=gapped)
    assert max_diff(moved[2, 6:], padded[2, 6:]) > 1e-4
    torch.testing.assert_close(moved[:2], padded[:2], rtol=0, atol=1e-12)


def test_eager_base_gives_the_same_bico_model():
    sdpa = patch_llama(tiny_model(seed=11))
    other = patch_llama(tiny_model(seed=11, attn="eager"))
    input_ids, attention_mask, position_ids = left_padded(11)
    torch.testing.assert_close(
        bico_logits(other, input_ids, attention_mask, position_ids=position_ids),
        bico_logits(sdpa, input_ids, attention_mask, position_ids=position_ids),
        rtol=0,
        atol=1e-10,
    )


def test_block_diagonal_4d_mask_equals_separate_blocks():
    """A 4D bool mask is honoured as given: two packed sequences equal the two run alone."""
    model = patch_llama(tiny_model(seed=12))
    input_ids, _ = batch(12, B=1, L=11)
    mask = torch.zeros(1, 1, 11, 11, dtype=torch.bool)
    mask[..., :6, :6] = True
    mask[..., 6:, 6:] = True
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None]

    packed = bico_logits(model, input_ids, mask, position_ids=position_ids)
    first = bico_logits(model, input_ids[:, :6])
    second = bico_logits(model, input_ids[:, 6:])
    torch.testing.assert_close(packed[:, :6], first, rtol=0, atol=1e-10)
    torch.testing.assert_close(packed[:, 6:], second, rtol=0, atol=1e-10)
    # Control: with a full 4D mask the blocks see each other.
    full = bico_logits(model, input_ids, torch.ones_like(mask), position_ids=position_ids)
    assert max_diff(full[:, :6], first) > 1e-4


def test_4d_mask_with_a_hidden_key_matches_2d_mask():
    model = patch_llama(tiny_model(seed=13))
    input_ids, attention_mask = batch(13, B=2, L=8)
    attention_mask[0, [0, 3]] = 0
    attention_mask[1, 5] = 0
    mask_4d = attention_mask.bool()[:, None, None, :].expand(2, 1, 8, 8)
    torch.testing.assert_close(
        bico_logits(model, input_ids, mask_4d),
        bico_logits(model, input_ids, attention_mask),
        rtol=0,
        atol=1e-10,
    )


def test_4d_blank_infilling_mask_conjugates_by_position():
    """GLM-style layout: Part A (indices 0-5) bidirectional; Part B (indices 6-8) re-uses the
    positions 2, 3, 4 of a masked span, sees all of Part A and itself causally. A Part B query
    then has keys *behind it in index* but *ahead of it in position*: those get the conjugate
    rotation. Checked layer by layer against the brute force; a float additive mask is the same."""
    model = patch_llama(tiny_model(seed=24))
    input_ids, _ = batch(24, B=1, L=9)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 2, 3, 4]])
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    mask[..., :6, :6] = True  # Part A <-> Part A
    mask[..., 6:, :6] = True  # Part B -> Part A
    mask[..., 6:, 6:] = torch.ones(3, 3, dtype=torch.bool).tril()  # Part B causally
    captured = capture_attention_layers(model, input_ids, mask, position_ids=position_ids)
    inv_freq = model.model.rotary_emb.inv_freq.double()
    all_keys = torch.ones(1, 9, dtype=torch.bool)
    for module, hidden, output in captured:
        with torch.no_grad():
            expected = brute_force_attention(module, hidden, position_ids, all_keys, inv_freq, pairwise=mask)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)

    additive = torch.zeros(1, 1, 9, 9, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    torch.testing.assert_close(
        bico_logits(model, input_ids, additive, position_ids=position_ids),
        bico_logits(model, input_ids, mask, position_ids=position_ids),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_fully_padded_batch_row_gives_finite_outputs_and_gradients(kernel):
    model = patch_llama(tiny_model(seed=25), kernel=kernel).train()
    input_ids, attention_mask, position_ids = left_padded(25)
    attention_mask[1] = 0  # a row with no visible key at all
    got_logits, grads = loss_and_grads(model, input_ids, attention_mask, position_ids=position_ids)
    assert torch.isfinite(got_logits).all()
    assert all(torch.isfinite(g).all() for g in grads)
    # The other rows are those of a batch without the empty row.
    keep = [0, 2]
    alone = bico_logits(model.eval(), input_ids[keep], attention_mask[keep], position_ids=position_ids[keep])
    torch.testing.assert_close(got_logits[keep], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_model_fused_error_at_most_twice_reference(dtype):
    """Whole-model logits in `dtype`, both kernels measured against the float64 model."""
    input_ids, attention_mask, position_ids = left_padded(26)
    attention_mask[0, 3] = 0
    visible = attention_mask.bool()
    exact = bico_logits(patch_llama(tiny_model(seed=26)), input_ids, attention_mask, position_ids=position_ids)
    model = patch_llama(tiny_model(seed=26, dtype=dtype))
    errors = {}
    for kernel in ("fused", "reference"):
        patch_llama(model, kernel=kernel)
        out = bico_logits(model, input_ids, attention_mask, position_ids=position_ids)
        assert out.dtype == dtype and torch.isfinite(out).all()
        errors[kernel] = (out.double() - exact)[visible].abs().max().item()
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert errors["fused"] <= 2 * errors["reference"] + floor, errors


# ----------------------------------------------------------------------------------------------
# Bare model, peft, gradient checkpointing, other families.
# ----------------------------------------------------------------------------------------------


def test_bare_llama_model():
    model = patch_llama(tiny_model(seed=14, model_cls=LlamaModel))
    plain = tiny_model(seed=14, model_cls=LlamaModel)
    input_ids, attention_mask = batch(14)
    attention_mask[1, 3] = 0
    assert torch.equal(logits(model, input_ids, attention_mask), logits(plain, input_ids, attention_mask))

    hidden = bico_logits(model, input_ids, attention_mask)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert max_diff(hidden[:, 0], bico_logits(model, changed, attention_mask)[:, 0]) > 1e-4
    patch_llama(model, kernel="reference")
    torch.testing.assert_close(bico_logits(model, input_ids, attention_mask), hidden, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_gradients_fused_equal_reference():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(15)
    base = tiny_model(seed=15)
    unwrapped_twin = tiny_model(seed=15)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random B as well as A, so every LoRA parameter gets a gradient
    )
    model = get_peft_model(base, lora)
    model.train()
    input_ids, attention_mask, position_ids = left_padded(15)
    attention_mask[0, 5] = 0
    causal_before = logits(model, input_ids, attention_mask, position_ids=position_ids)

    patch_llama(model)
    assert is_patched(model)
    assert torch.equal(logits(model, input_ids, attention_mask, position_ids=position_ids), causal_before)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora_params) == 2 * 4 * 2 and all(p.requires_grad for p in lora_params)

    fused_logits, fused = loss_and_grads(model, input_ids, attention_mask, lora_params, position_ids=position_ids)
    patch_llama(model, kernel="reference")
    ref_logits, ref = loss_and_grads(model, input_ids, attention_mask, lora_params, position_ids=position_ids)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0, atol=1e-10)
    assert_all_close(fused, ref, atol=1e-10)
    assert all(g.abs().max() > 0 for g in fused)
    # BICO mode was really on through the wrapper, and the wrapped model differs from the base one.
    assert max_diff(fused_logits, causal_before) > 1e-3
    assert max_diff(causal_before, logits(unwrapped_twin, input_ids, attention_mask, position_ids=position_ids)) > 1e-4

    unpatch_llama(model)
    assert torch.equal(logits(model, input_ids, attention_mask, position_ids=position_ids), causal_before)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_with_gradient_checkpointing():
    from peft import LoraConfig, get_peft_model

    input_ids, attention_mask, position_ids = left_padded(27)
    attention_mask[2, 7] = 0
    grads = []
    for checkpointing in (False, True):
        lora = LoraConfig(
            r=4, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        torch.manual_seed(27)
        model = get_peft_model(tiny_model(seed=27), lora)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        patch_llama(model).train()
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        grads.append(loss_and_grads(model, input_ids, attention_mask, lora_params, position_ids=position_ids)[1])
    assert_all_close(grads[1], grads[0], atol=1e-12)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_gradient_checkpointing_gradients_equal(use_reentrant, kernel):
    input_ids, attention_mask, position_ids = left_padded(16)
    attention_mask[0, 3] = 0

    model = patch_llama(tiny_model(seed=16), kernel=kernel).train()
    want_logits, want = loss_and_grads(model, input_ids, attention_mask, position_ids=position_ids)

    checkpointed = patch_llama(tiny_model(seed=16), kernel=kernel)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed.train()
    assert checkpointed.model.gradient_checkpointing
    # loss_and_grads calls backward() after the `bidirectional` block has closed.
    got_logits, got = loss_and_grads(checkpointed, input_ids, attention_mask, position_ids=position_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-12)
    assert_all_close(got, want, atol=1e-12)
    # Control: recomputing in causal mode would give these (different) gradients.
    _, causal = loss_and_grads(model, input_ids, attention_mask, bico=False, position_ids=position_ids)
    assert max(max_diff(a, b) for a, b in zip(got, causal)) > 1e-4


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_patch_and_run(family):
    plain = tiny_model(seed=17, family=family)
    model = patch_llama(tiny_model(seed=17, family=family)).train()
    input_ids, attention_mask, position_ids = left_padded(17)
    attention_mask[0, 2] = 0
    plain.train()
    _, plain_grads = loss_and_grads(plain, input_ids, attention_mask, bico=False, position_ids=position_ids)
    causal_logits, causal_grads = loss_and_grads(
        model, input_ids, attention_mask, bico=False, position_ids=position_ids
    )
    assert all(torch.equal(a, b) for a, b in zip(causal_grads, plain_grads))

    fused_logits, fused = loss_and_grads(model, input_ids, attention_mask, position_ids=position_ids)
    patch_llama(model, kernel="reference")
    ref_logits, ref = loss_and_grads(model, input_ids, attention_mask, position_ids=position_ids)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=0, atol=1e-10)
    assert_all_close(fused, ref, atol=1e-10)
    assert max_diff(fused_logits, causal_logits) > 1e-3

    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    model.eval()
    before, after = bico_logits(model, input_ids, attention_mask), bico_logits(model, changed, attention_mask)
    assert max_diff(before[:, 3], after[:, 3]) > 1e-4


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------


def test_model_without_rotary_embeddings_is_a_type_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(TypeError, match="rotary"):
        patch_llama(gpt2)
    with pytest.raises(TypeError, match="rotary"):
        patch_llama(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="rotary"):
        with bidirectional(nn.Linear(4, 4)):
            pass


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        },
    ],
    ids=["dynamic", "longrope"],
)
def test_unsupported_rope_type_is_a_value_error(rope_parameters):
    model = tiny_model(seed=18, rope_parameters=rope_parameters)
    with pytest.raises(ValueError, match=rope_parameters["rope_type"]):
        patch_llama(model)
    assert not is_patched(model)


def test_supported_rope_scaling_runs_and_kernels_agree():
    # "linear" keeps a fixed rotation per position (scaled), so it can be conjugated.
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = patch_llama(tiny_model(seed=19, rope_parameters=linear))
    input_ids, attention_mask = batch(19)
    fused = bico_logits(model, input_ids, attention_mask)
    patch_llama(model, kernel="reference")
    torch.testing.assert_close(bico_logits(model, input_ids, attention_mask), fused, rtol=0, atol=1e-10)


def test_sequence_longer_than_sliding_window_is_a_value_error():
    model = patch_llama(tiny_model(seed=28, family="mistral", sliding_window=4))
    input_ids, attention_mask = batch(28)
    with pytest.raises(ValueError, match="sliding_window"):
        bico_logits(model, input_ids, attention_mask)
    bico_logits(model, input_ids[:, :4], attention_mask[:, :4])  # within the window: fine


def test_attention_dropout_in_training_is_a_value_error():
    model = patch_llama(tiny_model(seed=20, attention_dropout=0.1))
    input_ids, attention_mask = batch(20)
    bico_logits(model, input_ids, attention_mask)  # eval mode: no dropout, fine
    model.train()
    logits(model, input_ids, attention_mask)  # causal mode with dropout: the stock model, fine
    with pytest.raises(ValueError, match="dropout"):
        bico_logits(model, input_ids, attention_mask)


# Every KV-cache keyword the installed transformers accepts: `cache` (5.24+) and its deprecated alias
# `past_key_values`, or only `past_key_values` before 5.24.
ACCEPTED_CACHE_KWARGS = list(CACHE_KWARGS) if CACHE_KWARG == "cache" else ["past_key_values"]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("cache_kwarg", ACCEPTED_CACHE_KWARGS)
def test_kv_cache_decoding_in_bico_mode_is_a_value_error(cache_kwarg):
    model = patch_llama(tiny_model(seed=21))
    input_ids, attention_mask = batch(21, B=1, L=6)
    with torch.no_grad():
        past = output_cache(model(input_ids=input_ids[:, :5], use_cache=True))
        with bidirectional(model):
            with pytest.raises(ValueError, match="cache"):
                model(input_ids=input_ids[:, 5:], use_cache=True, **{cache_kwarg: past})
        # The refusal comes before any layer runs: the cache is untouched and decoding goes on
        # outside the mode exactly as the stock causal model's.
        assert past.get_seq_length() == 5
        step = model(input_ids=input_ids[:, 5:], use_cache=True, **{cache_kwarg: past}).logits
    full = logits(model, input_ids)
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=0, atol=1e-10)


def test_the_project_uses_the_installed_cache_kwarg():
    assert CACHE_KWARG in inspect.signature(LlamaModel.forward).parameters


def test_bidirectional_on_unpatched_model_is_a_value_error():
    model = tiny_model(seed=22)
    with pytest.raises(ValueError, match="patch_llama"):
        with bidirectional(model):
            pass


def test_unknown_kernel_is_a_value_error():
    model = tiny_model(seed=23)
    with pytest.raises(ValueError, match="kernel"):
        patch_llama(model, kernel="flash")
    assert not is_patched(model)
