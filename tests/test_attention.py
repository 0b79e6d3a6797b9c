"""Tests for `bico.attention`: both kernels against an independent float64 brute force.

The brute force below never uses `bico`: it takes the *unrotated* queries and keys, builds the RoPE
rotation matrices explicitly from 2 x 2 blocks (HF's `rotate_half` layout pairs dim i with
dim i + D/2) and scores key n against query m with q_m^T R(p_n - p_m) k_n when n <= m (ordinary
RoPE) and q_m^T R(p_m - p_n) k_n when n > m (the conjugate rotation of BICO, arXiv 2311.07468
section 4.1). The triangles are chosen by index, the rotation angle by position id. Hidden keys
are left out of one softmax per row; a row with no visible key gives 0.

The kernels are fed the way the HF patch feeds them: q and k rotated by HF's own
`apply_rotary_pos_emb`, plus `conjugate_rotary` of those.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from bico.attention import bico_attention, bico_attention_reference, conjugate_rotary

THETA = 10000.0


# ----------------------------------------------------------------------------------------------
# The independent definition (float64).
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(D: int, theta: float = THETA) -> torch.Tensor:
    """(D / 2,) float64 inverse frequencies, as in Llama."""
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def rotation_matrices(angles: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Explicit (..., D, D) RoPE rotations R(angle): block i acts on dims (i, i + D/2)."""
    half = inv_freq.shape[0]
    D = 2 * half
    theta = angles[..., None].double() * inv_freq  # (..., D/2)
    cos, sin = theta.cos(), theta.sin()
    R = torch.zeros(*angles.shape, D, D, dtype=torch.float64)
    for i in range(half):
        # [[cos, -sin], [sin, cos]] on (x_i, x_{i + D/2}): the rotation HF's rotate_half performs.
        R[..., i, i] = cos[..., i]
        R[..., i, i + half] = -sin[..., i]
        R[..., i + half, i] = sin[..., i]
        R[..., i + half, i + half] = cos[..., i]
    return R


def brute_force(q, k, v, positions, inv_freq, key_mask=None, scale=None):
    """BICO attention from unrotated q (B, H, L, D), k and v (B, H_kv, L, D); returns (B, L, H, D).

    `positions` is (B, L) or (1, L). `key_mask` (B, L) bool, False = hidden key.
    """
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    n_rep = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    positions = positions.expand(B, L).double()
    p_m = positions[:, :, None]  # query position, (B, L, 1)
    p_n = positions[:, None, :]  # key position, (B, 1, L)
    index = torch.arange(L)
    key_not_ahead = index[None, :] <= index[:, None]  # (L, L): [m, n] is True when n <= m
    rel = torch.where(key_not_ahead, p_n - p_m, p_m - p_n)  # (B, L, L)
    R = rotation_matrices(rel, inv_freq)  # (B, L, L, D, D)

    kv_head = torch.arange(H) // n_rep  # query head h reads kv head h // n_rep (HF repeat_kv)
    k_full, v_full = k[:, kv_head], v[:, kv_head]  # (B, H, L, D)
    scores = torch.einsum("bhmd,bmnde,bhne->bhmn", q, R, k_full) * scale  # (B, H, L, L)

    if key_mask is None:
        key_mask = torch.ones(B, L, dtype=torch.bool)
    allowed = key_mask.bool()[:, None, None, :].expand(B, H, L, L)
    # Plain exp / sum over the visible keys; a row without any gives 0 (and no NaN in gradients).
    row_max = scores.masked_fill(~allowed, -1e300).amax(-1, keepdim=True).detach()
    row_max = torch.where(allowed.any(-1, keepdim=True), row_max, torch.zeros_like(row_max))
    weights = torch.where(allowed, torch.exp(torch.where(allowed, scores - row_max, torch.zeros_like(scores))), 0.0)
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("bhmn,bhnd->bhmd", probs, v_full)
    return out.transpose(1, 2)  # (B, L, H, D)


def hf_rotate(q, k, positions, inv_freq):
    """Rotate q, k the way LlamaAttention does, with cos / sin built in float64 from the positions."""
    B = q.shape[0]
    freqs = positions.expand(B, -1).double()[..., None] * inv_freq  # (B, L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, D)
    return apply_rotary_pos_emb(q, k, emb.cos().to(q.dtype), emb.sin().to(q.dtype))


def kernel_inputs(q, k, positions, inv_freq):
    """(query, key, query_conj, key_conj) exactly as `bico.patch` builds them."""
    q_rot, k_rot = hf_rotate(q, k, positions, inv_freq)
    # (1, L) positions are passed as they are, as the patch does with HF's default position_ids.
    return q_rot, k_rot, conjugate_rotary(q_rot, positions, inv_freq), conjugate_rotary(k_rot, positions, inv_freq)


KERNELS = {"reference": bico_attention_reference, "fused": bico_attention}


def run_kernel(name, q, k, v, positions, inv_freq, key_mask, scale=None):
    q_rot, k_rot, q_conj, k_conj = kernel_inputs(q, k, positions, inv_freq)
    return KERNELS[name](q_rot, k_rot, v, q_conj, k_conj, key_mask, scale)


# ----------------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------------


def _hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """HF-style position ids for a padded batch: running count of real tokens, padding gets 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)


def _make_case(name: str, generator: torch.Generator):
    """Returns (B, H, H_kv, L, D, key_mask or None, positions (B, L) or (1, L), scale or None)."""
    B, H, H_kv, L, D = 2, 4, 2, 8, 16
    scale = None
    mask = None
    positions = None  # defaults to arange(L) once L is known
    if name == "gqa_kv2":
        pass
    elif name == "gqa_kv1":
        H_kv = 1
    elif name == "mha_kv4":
        H_kv = 4
        scale = 0.3
    elif name == "left_padding":
        B, L = 3, 9
        pads = [0, 3, 6]
        mask = torch.stack([torch.arange(L) >= p for p in pads])
        positions = _hf_positions(mask)
    elif name == "right_padding":
        B, L = 3, 9
        lengths = [9, 5, 2]
        mask = torch.stack([torch.arange(L) < n for n in lengths])
    elif name == "placeholders":
        B, L = 2, 10
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, [0, 4, 5, 8]] = False  # includes position 0
        mask[1, [2, 9]] = False
    elif name == "fully_masked_row":
        B, L = 3, 7
        mask = torch.rand(B, L, generator=generator) > 0.3
        mask[0, 0] = True
        mask[1] = False  # every query of batch row 1 sees nothing
    elif name == "single_visible_key":
        B, L = 2, 7
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[0, 6] = True  # only the last key: every earlier query attends only ahead
        mask[1, 0] = True  # only the first key: every later query attends only behind
    elif name == "L1":
        L = 1
        positions = torch.zeros(1, 1, dtype=torch.long)
    elif name == "L1_masked":
        L = 1
        mask = torch.tensor([[True], [False]])
        positions = torch.tensor([[0], [5]])
    elif name == "odd_7":
        L = 7
        mask = torch.rand(B, L, generator=generator) > 0.25
    elif name == "odd_33":
        L, H_kv = 33, 1
        mask = torch.rand(B, L, generator=generator) > 0.25
        mask[:, 0] = False
    elif name == "batch_positions":
        # Left padding with per-row offsets: real tokens start at offset, padding runs below it.
        B, L = 3, 11
        pads, offsets = [0, 2, 5], [0, 7, 3]
        mask = torch.stack([torch.arange(L) >= p for p in pads])
        positions = torch.stack([torch.arange(L) - p + o for p, o in zip(pads, offsets)])
    elif name == "large_positions":
        L = 9
        positions = (torch.arange(L) * 37 + 1000)[None]
        mask = torch.rand(B, L, generator=generator) > 0.2
    else:
        raise AssertionError(name)
    if positions is None:
        positions = torch.arange(L)[None]
    return B, H, H_kv, L, D, mask, positions, scale


CASES = [
    "gqa_kv2", "gqa_kv1", "mha_kv4", "left_padding", "right_padding", "placeholders",
    "fully_masked_row", "single_visible_key", "L1", "L1_masked", "odd_7", "odd_33",
    "batch_positions", "large_positions",
]


def _random_inputs(B, H, H_kv, L, D, generator, dtype=torch.float64):
    q = torch.randn(B, H, L, D, generator=generator, dtype=torch.float64)
    k = torch.randn(B, H_kv, L, D, generator=generator, dtype=torch.float64)
    v = torch.randn(B, H_kv, L, D, generator=generator, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


# ----------------------------------------------------------------------------------------------
# Exactness in float64.
# ----------------------------------------------------------------------------------------------


def test_brute_force_reduces_to_causal_rope_attention_on_lower_triangle():
    """Sanity check of the test's own definition: with every look-ahead key hidden from a query
    (last query of a sequence), it equals ordinary softmax attention over HF-rotated q, k."""
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 1, 2, 6, 8
    inv_freq = rope_inv_freq(D)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(L)[None]
    out = brute_force(q, k, v, positions, inv_freq)  # (B, L, H, D)
    q_rot, k_rot = hf_rotate(q, k, positions, inv_freq)
    causal = torch.nn.functional.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True)  # (B, H, L, D)
    torch.testing.assert_close(out[:, -1], causal.transpose(1, 2)[:, -1], rtol=0, atol=1e-13)
    # And earlier queries do see ahead (the output differs from causal attention there).
    assert (out[:, 0] - causal.transpose(1, 2)[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", ["reference", "fused"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_brute_force_float64(kernel, case):
    g = torch.Generator().manual_seed(CASES.index(case))
    B, H, H_kv, L, D, mask, positions, scale = _make_case(case, g)
    inv_freq = rope_inv_freq(D)
    q, k, v = _random_inputs(B, H, H_kv, L, D, g)
    weight = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)

    expected = brute_force(q, k, v, positions, inv_freq, mask, scale)
    expected_grads = torch.autograd.grad((expected * weight).sum(), (q, k, v))
    out = run_kernel(kernel, q, k, v, positions, inv_freq, mask, scale)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))

    assert out.shape == (B, L, H, D) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for name, got, want in zip("qkv", grads, expected_grads):
        assert torch.isfinite(got).all(), f"non-finite d{name}"
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_fully_masked_rows_are_zero_without_nan(kernel):
    g = torch.Generator().manual_seed(1)
    B, H, H_kv, L, D = 3, 4, 2, 9, 16
    inv_freq = rope_inv_freq(D)
    mask = torch.rand(B, L, generator=g) > 0.4
    mask[0] = False
    mask[2] = False
    mask[1, 3] = True
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        q, k, v = _random_inputs(B, H, H_kv, L, D, g, dtype)
        out = run_kernel(kernel, q, k, v, torch.arange(L)[None], inv_freq, mask)
        grads = torch.autograd.grad(out.float().square().sum() + out.float().sum(), (q, k, v))
        assert torch.isfinite(out).all(), dtype
        assert (out[0] == 0).all() and (out[2] == 0).all(), dtype
        assert out[1].abs().max() > 0, dtype
        for grad in grads:
            assert torch.isfinite(grad).all(), dtype
            assert (grad[0] == 0).all() and (grad[2] == 0).all(), dtype


def test_fused_without_mask_equals_all_true_mask():
    g = torch.Generator().manual_seed(2)
    B, H, H_kv, L, D = 2, 4, 2, 12, 16
    inv_freq = rope_inv_freq(D)
    q, k, v = _random_inputs(B, H, H_kv, L, D, g)
    positions = torch.arange(L)[None]
    a = run_kernel("fused", q, k, v, positions, inv_freq, None)
    b = run_kernel("fused", q, k, v, positions, inv_freq, torch.ones(B, L, dtype=torch.bool))
    assert torch.equal(a, b)


def test_hidden_keys_have_no_influence():
    """Changing the key / value at a hidden position changes no output (placeholders, padding)."""
    g = torch.Generator().manual_seed(3)
    B, H, H_kv, L, D = 2, 4, 2, 10, 16
    inv_freq = rope_inv_freq(D)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, [0, 4]] = False
    positions = torch.arange(L)[None]
    q, k, v = (t.detach() for t in _random_inputs(B, H, H_kv, L, D, g))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, [0, 4]] += 5.0
    v2[:, :, [0, 4]] -= 3.0
    for kernel in KERNELS:
        a = run_kernel(kernel, q, k, v, positions, inv_freq, mask)
        b = run_kernel(kernel, q, k2, v2, positions, inv_freq, mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        # Control: the same change at a visible position does change the output.
        k3 = k.clone()
        k3[:, :, 2] += 5.0
        c = run_kernel(kernel, q, k3, v, positions, inv_freq, mask)
        assert (a - c).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# The mirror property.
# ----------------------------------------------------------------------------------------------


def _attention_probabilities(kernel, q_rot, k_rot, q_conj, k_conj, key_mask, positions):
    """Read the attention weights off the kernel: values are one-hot per key position."""
    B, H, L, D = q_rot.shape
    assert D >= L
    v = torch.eye(L, D, dtype=q_rot.dtype)[None, None].expand(B, k_rot.shape[1], L, D)
    out = kernel(q_rot, k_rot, v, q_conj, k_conj, key_mask)  # (B, L, H, D)
    return out[..., :L]  # (B, L, H, L): [b, m, h, n] = weight of key n for query m


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_mirror_property(kernel):
    """With the same unrotated key at every position, a key d ahead of the query gets exactly the
    weight of the key d behind it; with ordinary RoPE for both directions it does not."""
    g = torch.Generator().manual_seed(4)
    B, H, L, D = 1, 2, 11, 16
    inv_freq = rope_inv_freq(D, theta=50.0)  # coarse frequencies: scores vary a lot with distance
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 3
    k = torch.randn(B, 1, 1, D, generator=g, dtype=torch.float64).expand(B, 1, L, D) * 3
    positions = (torch.arange(L) + 17)[None]
    q_rot, k_rot, q_conj, k_conj = kernel_inputs(q, k, positions, inv_freq)
    probs = _attention_probabilities(KERNELS[kernel], q_rot, k_rot, q_conj, k_conj, None, positions)

    m = 5  # the query in the middle: keys d = 1..5 on both sides
    for d in range(1, 6):
        torch.testing.assert_close(probs[0, m, :, m + d], probs[0, m, :, m - d], rtol=1e-12, atol=1e-15)
    # Not trivially symmetric: the weights do depend on the distance.
    assert (probs[0, m, :, m + 1] - probs[0, m, :, m + 4]).abs().max() > 1e-3

    # Control: without the conjugate rotation the mirror property fails.
    plain = _attention_probabilities(KERNELS[kernel], q_rot, k_rot, q_rot, k_rot, None, positions)
    assert (plain[0, m, :, m + 2] - plain[0, m, :, m - 2]).abs().max() > 1e-3


def test_mirror_property_on_scores():
    """Score level: conjugate score at distance +d equals ordinary score at distance -d, for any d
    and any absolute position (relative-position invariance of both rotations)."""
    g = torch.Generator().manual_seed(5)
    D = 16
    inv_freq = rope_inv_freq(D)
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)

    def rotated(x, pos):
        p = torch.tensor([[pos]])
        x_rot, _ = hf_rotate(x, x, p, inv_freq)
        return x_rot, conjugate_rotary(x_rot, p, inv_freq)

    for m in (0, 3, 250):
        q_rot, q_conj = rotated(q, m)
        for d in (1, 2, 7, 40):
            k_behind, _ = rotated(k, m - d)
            _, k_ahead_conj = rotated(k, m + d)
            behind = (q_rot * k_behind).sum()
            ahead = (q_conj * k_ahead_conj).sum()
            torch.testing.assert_close(ahead, behind, rtol=0, atol=1e-12)
            # And it is the brute-force rotation: q^T R(-d) k.
            expected = q.flatten() @ rotation_matrices(torch.tensor(-float(d)), inv_freq) @ k.flatten()
            torch.testing.assert_close(behind, expected, rtol=0, atol=1e-12)


def test_conjugate_rotary_is_rotation_by_minus_position():
    g = torch.Generator().manual_seed(6)
    B, H, L, D = 2, 3, 5, 8
    inv_freq = rope_inv_freq(D)
    x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [9, 8, 100, -3, 1]])
    x_rot, _ = hf_rotate(x, x, positions, inv_freq)
    conj = conjugate_rotary(x_rot, positions, inv_freq)
    x_neg, _ = hf_rotate(x, x, -positions, inv_freq)
    torch.testing.assert_close(conj, x_neg, rtol=0, atol=1e-12)
    assert conj.dtype == x.dtype and conj.shape == x.shape


def test_conjugate_rotary_gradient_and_strided_input():
    g = torch.Generator().manual_seed(7)
    B, L, H, D = 2, 4, 3, 8
    inv_freq = rope_inv_freq(D)
    positions = torch.tensor([[0, 1, 2, 3], [5, 0, 7, 2]])
    # HF hands the attention (B, H, L, D) views of (B, L, H, D) storage.
    x = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: conjugate_rotary(t, positions, inv_freq), (x,))
    torch.testing.assert_close(
        conjugate_rotary(x, positions, inv_freq), conjugate_rotary(x.contiguous(), positions, inv_freq), rtol=0, atol=0
    )


# ----------------------------------------------------------------------------------------------
# Low precision: the fused kernel's error is at most 2x the reference's own error.
# ----------------------------------------------------------------------------------------------

# Small absolute floors. float32: torch's own CPU flash backward is ~2.5x less accurate than its
# math backward (measured: 1.1e-6 vs 4.5e-7 on gradients of size ~2), i.e. a few ulps; 1e-6 is
# about 4 ulps at the gradients' scale here. bfloat16 / float16: a fraction of the reference's own
# error (~1e-2 / ~1e-3), so the 2x bound is what is tested.
FLOORS = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [7, 8])
def test_low_precision_fused_error_at_most_twice_reference(dtype, seed, device):
    """Both kernels get the float64-rotated states cast to `dtype` (what the patch hands them) and
    are measured against the float64 brute force: output and gradients w.r.t. unrotated q, k, v.
    On CUDA the fused kernel must also really take its fused path (not the reference fallback)."""
    if device == "cuda":
        from bico.attention import _cuda_backend_works

        assert _cuda_backend_works(torch.device("cuda"), dtype), "the fused CUDA path failed its self-check"
    g = torch.Generator().manual_seed(seed)
    B, H, H_kv, L, D = 2, 4, 2, 33, 32
    inv_freq = rope_inv_freq(D)
    mask = torch.rand(B, L, generator=g) > 0.2
    mask[:, 0] = False
    positions = _hf_positions(mask)
    q64, k64, v64 = (t.detach() for t in _random_inputs(B, H, H_kv, L, D, g))
    weight = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)

    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    expected = brute_force(*leaves64, positions, inv_freq, mask)
    expected_grads = torch.autograd.grad((expected * weight).sum(), leaves64)

    q_rot, k_rot, q_conj, k_conj = kernel_inputs(q64, k64, positions, inv_freq)
    inputs = [t.to(device, dtype) for t in (q_rot, k_rot, v64, q_conj, k_conj)]
    errors = {}
    for kernel in KERNELS:
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = KERNELS[kernel](*leaves, mask.to(device))
        assert out.dtype == dtype and out.device.type == device
        grads = torch.autograd.grad((out.double() * weight.to(device)).sum(), leaves)
        out, grads = out.cpu(), [grad.cpu() for grad in grads]
        # Gradients w.r.t. unrotated q, k: chain rule through both rotations, in float64.
        dq = _unrotate(grads[0].double(), grads[3].double(), positions, inv_freq)
        dk = _unrotate(grads[1].double(), grads[4].double(), positions, inv_freq)
        errors[kernel] = [
            (out.double() - expected).abs().max().item(),
            (dq - expected_grads[0]).abs().max().item(),
            (dk - expected_grads[1]).abs().max().item(),
            (grads[2].double() - expected_grads[2]).abs().max().item(),
        ]
    for what, fused, ref in zip(["out", "dq", "dk", "dv"], errors["fused"], errors["reference"]):
        assert fused <= 2 * ref + FLOORS[dtype], f"{dtype} {what}: fused error {fused:.3g} vs reference {ref:.3g}"


def _unrotate(grad_rot, grad_conj, positions, inv_freq):
    """Chain rule through x_rot = R(p) x and x_conj = R(-p) x: dx = R(p)^T g_rot + R(-p)^T g_conj."""
    back, _ = hf_rotate(grad_rot, grad_rot, -positions, inv_freq)
    back_conj, _ = hf_rotate(grad_conj, grad_conj, positions, inv_freq)
    return back + back_conj


# ----------------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_input_errors(kernel):
    attend = KERNELS[kernel]
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        attend(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), q, torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="KV cache"):
        k6 = torch.randn(1, 2, 6, 8)
        attend(q, k6, k6, q, k6)
    with pytest.raises(ValueError, match="key_mask"):
        attend(q, k, k, q, k, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="query"):
        attend(q.int(), k.int(), k.int(), q.int(), k.int())
