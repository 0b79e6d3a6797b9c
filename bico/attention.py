"""Bidirectional-RoPE attention: one softmax over a causal and a conjugate-rotated anti-causal triangle.

BICO (Lv et al., arXiv 2311.07468, section 4.1) makes a causal LM attend in both directions without
ever showing a query a relative position it did not see in pre-training. A key at or before the
query (n <= m) is scored with the ordinary RoPE rotation, q_m^T R(n - m) k_n. A key ahead of the
query (n > m) is scored with the conjugate rotation, q_m^T R(m - n) k_n, so a key d positions
ahead looks exactly like a key d positions behind. Both triangles share one softmax per row.

Differences from stock Llama attention:
    * two score triangles (ordinary below and on the diagonal, conjugate strictly above);
    * keys are hidden by a per-key mask (padding and placeholders) instead of a causal mask.

This module is pure torch. It offers
    * `conjugate_rotary`: turns RoPE-rotated q or k into their conjugate rotation;
    * `bico_attention_reference`: the readable definition, with both L x L score matrices;
    * `bico_attention`: the fused kernel, two causal flash-attention problems merged by
      log-sum-exp, with an exact backward; it never builds an L x L matrix.
All take q (B, H, L, D), k and v (B, H_kv, L, D) with H a multiple of H_kv (GQA), and return
(B, L, H, D), the layout every transformers attention backend returns.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + D/2) pair of `x` (B, H, L, D) by the angles whose cos/sin are (B, 1, L, D/2).

    Writes the two halves straight into the output: no `rotate_half` copy, no cat.
    """
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)  # keeps HF's (B, L, H, D) memory layout, so no copies on the way back
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _ConjugateRotary(torch.autograd.Function):
    """A rotation is orthogonal, so its backward is the same rotation with the sine negated."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin.neg()), None, None


def conjugate_rotary(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-rotated states by -2 * position, which turns the rotation R(m) into R(-m).

    Args:
        x (`torch.Tensor` of shape `(B, H, L, D)`): queries or keys already rotated by HF's
            `apply_rotary_pos_emb` (the `rotate_half` layout, any dtype).
        position_ids (`torch.LongTensor` of shape `(B, L)` or `(1, L)`): the positions they were rotated with.
        inv_freq (`torch.Tensor` of shape `(D / 2,)`): the rotary inverse frequencies.

    Returns:
        `torch.Tensor` of the shape, dtype and memory layout of `x`. A scaled rotation (YaRN's attention
        factor) keeps its scale, since a pure rotation is applied on top of it. As in HF's own
        `apply_rotary_pos_emb`, the angles are computed in float32 (float64 for float64 input) and
        the rotation in the dtype of `x`.
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = -2.0 * position_ids[:, None, :, None].to(compute_dtype) * inv_freq.to(x.device, compute_dtype)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (B, 1, L, D/2)
    return _ConjugateRotary.apply(x, cos, sin)


def _autocast_aware(kernel):
    """Give a kernel one compute dtype under autocast, as `scaled_dot_product_attention` has.

    Under autocast HF's RoPE multiplies the low-precision q and k by float32 cos/sin, so q and k
    arrive in float32 and v in bf16/fp16. Stock SDPA is on autocast's lower-precision list and casts
    all three to the autocast dtype; raw flash ops inside an autograd.Function are not, so the kernel
    casts its five states here and then runs with autocast off (its softmax statistics stay float32).
    """

    @functools.wraps(kernel)
    def wrapper(query, key, value, query_conj, key_conj, *args, **kwargs):
        device_type = query.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value, query_conj, key_conj = (
                t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                for t in (query, key, value, query_conj, key_conj)
            )
            with torch.autocast(device_type, enabled=False):
                return kernel(query, key, value, query_conj, key_conj, *args, **kwargs)
        return kernel(query, key, value, query_conj, key_conj, *args, **kwargs)

    return wrapper


def _check_inputs(query, key, value, query_conj, key_conj, key_mask) -> None:
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"`query` has dtype {query.dtype}; expected one of {SUPPORTED_DTYPES}.")
    dtypes = {t.dtype for t in (query, key, value, query_conj, key_conj)}
    if len(dtypes) > 1:
        raise TypeError(
            f"`query`, `key`, `value`, `query_conj` and `key_conj` must share one dtype, got {sorted(map(str, dtypes))}; "
            "cast them, or run under `torch.autocast`, which casts them to its dtype."
        )
    B, H, L, D = query.shape
    H_kv = key.shape[1]
    if key.shape != value.shape or key.shape[0] != B or key.shape[-1] != D:
        raise ValueError(f"`key`/`value` shapes {tuple(key.shape)}/{tuple(value.shape)} do not fit `query` {tuple(query.shape)}.")
    if H % H_kv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({H_kv}).")
    if query_conj.shape != query.shape or key_conj.shape != key.shape:
        raise ValueError("`query_conj`/`key_conj` must have the shapes of `query`/`key`.")
    if key.shape[2] != L:
        raise ValueError(
            f"bidirectional attention needs as many keys as queries, got {key.shape[2]} keys for {L} queries "
            "(incremental decoding with a KV cache is causal-only)."
        )
    if key_mask is not None and key_mask.shape != (B, L):
        raise ValueError(f"`key_mask` has shape {tuple(key_mask.shape)}; expected (B, L) = {(B, L)}.")


@_autocast_aware
def bico_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_conj: torch.Tensor,
    key_conj: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    conjugate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The readable definition: both score matrices, tril + strict triu, one softmax.

    Args:
        query, query_conj (`torch.Tensor` of shape `(B, H, L, D)`): queries with the ordinary and
            the conjugate rotation.
        key, key_conj, value (`torch.Tensor` of shape `(B, H_kv, L, D)`): keys (both rotations) and values.
        key_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): False hides a key (padding,
            placeholders) from every query. Defaults to all keys visible.
        scale (`float`, *optional*): score scale, defaults to `1 / sqrt(D)`.
        attn_mask (`torch.BoolTensor` broadcastable to `(B, H, L, L)`, *optional*): an extra
            allowed-pairs mask (True = may attend), e.g. the blank-infilling layout.
        conjugate (`torch.BoolTensor` broadcastable to `(B, H, L, L)`, *optional*): where to use the
            conjugate scores. Defaults to the strict upper triangle (key index > query index).

    Returns:
        `torch.Tensor` of shape `(B, L, H, D)`. A query that may attend to no key returns zeros
        (and zero gradients), never NaN. Under `torch.autocast` the states are first cast to the
        autocast dtype (as SDPA does), so the output has that dtype.
    """
    _check_inputs(query, key, value, query_conj, key_conj, key_mask)
    B, H, L, D = query.shape
    n_rep = H // key.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    key, key_conj, value = (t.repeat_interleave(n_rep, dim=1) for t in (key, key_conj, value))  # (B, H, L, D)

    lower = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, L, L)
    upper = torch.matmul(query_conj, key_conj.transpose(-1, -2)) * scale  # (B, H, L, L)
    if conjugate is None:
        conjugate = torch.ones(L, L, dtype=torch.bool, device=query.device).triu(1)
    scores = torch.where(conjugate, upper, lower)

    allowed = torch.ones(B, 1, 1, L, dtype=torch.bool, device=query.device)
    if key_mask is not None:
        allowed = key_mask[:, None, None, :].bool()
    if attn_mask is not None:
        allowed = allowed & attn_mask.bool()
    allowed = allowed.expand(B, H, L, L)
    # finfo.min rather than -inf: a fully masked row then softmaxes to finite values we zero below.
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs = probs * allowed.any(dim=-1, keepdim=True)
    out = torch.matmul(probs.to(value.dtype), value)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous()  # (B, L, H, D)


# ----------------------------------------------------------------------------------------------
# Fused kernel: lower triangle and strict upper triangle as two causal problems, merged by lse.
# ----------------------------------------------------------------------------------------------


def _reverse_shift_index(length: int, device) -> torch.Tensor:
    """The permutation [0, L-1, L-2, ..., 1]: reverse a sequence and shift it one step right.

    Through a causal mask, query i of the reversed queries then sees exactly the keys that lay
    strictly after it in the original order; index 0 becomes a dummy key that the mask always hides
    (its content, key 0, never gets attention, so its gradient is exactly 0). The permutation is its
    own inverse, so the same gather maps the gradients back. One gather instead of flip + cat.
    """
    index = torch.arange(length, 0, -1, device=device)
    index[0] = 0
    return index


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool -> (B, 1, 1, L) additive mask: 0 where visible, -inf where hidden."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[:, None, None, :]


class _CPUFlash:
    """torch's CPU flash-attention ops: they return the lse and take an additive mask and GQA."""

    @staticmethod
    def forward(q, k, v, mask, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, attn_mask=_additive(mask, q.dtype), scale=scale
        )
        return out, lse  # (B, H, L, D), (B, H, L)

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, mask, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, True, attn_mask=_additive(mask, q.dtype), scale=scale
        )


class _CUDAEfficient:
    """torch's memory-efficient attention ops (CUDA): lse on request, an additive bias, no GQA."""

    @staticmethod
    def _bias(mask, q):
        B, H, L, _ = q.shape
        # The kernel wants a bias whose last dim is 16-aligned in memory; slicing a padded one keeps that.
        L16 = (L + 15) // 16 * 16
        bias = torch.zeros(B, 1, 1, L16, dtype=q.dtype, device=q.device)
        bias[..., :L] = _additive(mask, q.dtype)
        return bias[..., :L].expand(B, H, L, L)

    @staticmethod
    def forward(q, k, v, mask, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(n_rep, dim=1) for t in (k, v))
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _CUDAEfficient._bias(mask, q), True, 0.0, True, scale=scale
        )
        return out, lse[..., : q.shape[2]]

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, mask, scale):
        H_kv, n_rep = k.shape[1], q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(n_rep, dim=1) for t in (k, v))
        L = q.shape[2]
        lse_padded = lse.new_zeros(*lse.shape[:-1], (L + 31) // 32 * 32)
        lse_padded[..., :L] = lse
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out.contiguous(), q, k, v, _CUDAEfficient._bias(mask, q), out, lse_padded.contiguous(),
            seed, offset, 0.0, [True, True, True, False], True, scale=scale,
        )
        fold = lambda g: g.unflatten(1, (H_kv, n_rep)).sum(2)  # noqa: E731 (B, H, L, D) -> (B, H_kv, L, D)
        return dq, fold(dk), fold(dv)


def _no_key_rows(key_mask: torch.Tensor, upper: bool) -> torch.Tensor:
    """(B, L) bool: rows whose triangle (lower incl. diagonal, or strict upper) has no visible key."""
    counts = key_mask.int()
    if upper:
        seen = counts.flip(-1).cumsum(-1).flip(-1) - counts  # keys strictly after i
    else:
        seen = counts.cumsum(-1)  # keys at or before i
    return seen == 0


class _BicoFlashFunction(torch.autograd.Function):
    """Exact forward and backward of the two-triangle softmax, one flash call per triangle.

    Backward drives each triangle's flash backward with the *merged* output and lse, which gives
    the gradient of the joint softmax (the ring-attention argument), so nothing L x L is stored.
    """

    @staticmethod
    def forward(ctx, query, key, value, query_conj, key_conj, key_mask, scale, backend):
        perm = _reverse_shift_index(query.shape[2], query.device)
        q_up = query_conj.flip(2)  # (B, H, L, D), reversed
        k_up, v_up = key_conj.index_select(2, perm), value.index_select(2, perm)  # (B, H_kv, L, D)
        mask_up = key_mask.index_select(1, perm)  # (B, L)
        mask_up[:, 0] = False  # the dummy key

        out_lo, lse_lo = backend.forward(query, key, value, key_mask, scale)
        out_up, lse_up = backend.forward(q_up, k_up, v_up, mask_up, scale)
        out_up, lse_up = out_up.flip(2), lse_up.flip(2)

        # The kernels report lse 0 (not -inf) on rows without a visible key: set it from the mask.
        neg_inf = float("-inf")
        lse_lo = lse_lo.masked_fill(_no_key_rows(key_mask, upper=False)[:, None, :], neg_inf)
        lse_up = lse_up.masked_fill(_no_key_rows(key_mask, upper=True)[:, None, :], neg_inf)
        # Weight of the lower triangle in the joint softmax; a row with no key at all gets 0.5 of two zeros.
        w_lo = torch.sigmoid(torch.nan_to_num(lse_lo - lse_up, nan=0.0))[..., None]
        out = torch.lerp(out_up.to(w_lo.dtype), out_lo.to(w_lo.dtype), w_lo).to(query.dtype)  # (B, H, L, D)
        lse = torch.logaddexp(lse_lo, lse_up)  # (B, H, L)
        # Backward needs a finite lse: on empty rows every score is -inf, so any value gives p = 0.
        lse = lse.masked_fill(torch.isinf(lse), 0.0)

        ctx.save_for_backward(query, key, value, q_up, k_up, v_up, key_mask, mask_up, perm, out, lse)
        ctx.scale, ctx.backend = scale, backend
        return out.transpose(1, 2).contiguous()  # (B, L, H, D)

    @staticmethod
    def backward(ctx, grad):
        query, key, value, q_up, k_up, v_up, key_mask, mask_up, perm, out, lse = ctx.saved_tensors
        scale, backend = ctx.scale, ctx.backend
        grad = grad.transpose(1, 2).contiguous()  # (B, H, L, D)

        dq, dk, dv = backend.backward(grad, query, key, value, out, lse, key_mask, scale)
        dq_up, dk_up, dv_up = backend.backward(
            grad.flip(2), q_up, k_up, v_up, out.flip(2), lse.flip(2).contiguous(), mask_up, scale
        )
        dv = dv.index_add_(2, perm, dv_up)  # dv_up[0] (the dummy) is 0 and lands on key 0
        return dq, dk, dv, dq_up.flip(2), dk_up.index_select(2, perm), None, None, None


_CUDA_CHECKED: dict[int, bool] = {}


def _cuda_backend_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Check the CUDA fused path once per device against the reference; False means fall back."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_CHECKED:
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            q, qc = (torch.randn(2, 4, 37, 64, generator=g).to(device) for _ in range(2))
            k, kc, v = (torch.randn(2, 2, 37, 64, generator=g).to(device) for _ in range(3))
            mask = torch.rand(2, 37, generator=g).to(device) > 0.3
            args = [t.requires_grad_() for t in (q, k, v, qc, kc)]
            fused = _BicoFlashFunction.apply(*args[:3], *args[3:], mask, 0.125, _CUDAEfficient)
            grads = torch.autograd.grad(fused.square().sum(), args)
            ref = bico_attention_reference(*args, key_mask=mask, scale=0.125)
            ref_grads = torch.autograd.grad(ref.square().sum(), args)
            ok = torch.allclose(fused, ref, atol=1e-4) and all(
                torch.allclose(a, b, atol=1e-3) for a, b in zip(grads, ref_grads)
            )
        except RuntimeError as err:  # op missing in this build or on this GPU
            logger.warning("bico: the fused CUDA attention path is unavailable (%s); using the reference.", err)
            ok = False
        else:
            if not ok:
                logger.warning("bico: the fused CUDA attention path failed its self-check; using the reference.")
        _CUDA_CHECKED[index] = ok
    return _CUDA_CHECKED[index]


@_autocast_aware
def bico_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_conj: torch.Tensor,
    key_conj: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused bidirectional-RoPE attention: split into two causal problems, merged by log-sum-exp.

    The lower triangle (diagonal included) is ordinary causal flash attention. The strict upper
    triangle is causal flash attention on the reversed sequence with keys shifted by one. The
    two partial outputs are merged with their lse, so the result equals one softmax over the whole
    row. Memory is O(B * H * L * D); no L x L matrix is built.

    Args:
        query, query_conj (`torch.Tensor` of shape `(B, H, L, D)`): queries with the ordinary and
            the conjugate rotation (see `conjugate_rotary`).
        key, key_conj, value (`torch.Tensor` of shape `(B, H_kv, L, D)`): keys (both rotations) and
            values; `H` must be a multiple of `H_kv`.
        key_mask (`torch.BoolTensor` of shape `(B, L)`, *optional*): False hides a key from every
            query (padding and placeholders). Defaults to all keys visible.
        scale (`float`, *optional*): score scale, defaults to `1 / sqrt(D)`.

    Returns:
        `torch.Tensor` of shape `(B, L, H, D)` in the dtype of `query` (under `torch.autocast`, in
        the autocast dtype: the states are cast to it first, as SDPA does). A query with no visible
        key returns zeros; its merged lse is -inf internally and its gradients are zero.

    CPU uses torch's flash-attention CPU ops; CUDA uses the memory-efficient attention ops after a
    one-time self-check against the reference (warning and falling back to the reference if they
    are missing or disagree); other devices use the reference.
    """
    _check_inputs(query, key, value, query_conj, key_conj, key_mask)
    B, H, L, D = query.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if key_mask is None:
        key_mask = torch.ones(B, L, dtype=torch.bool, device=query.device)
    key_mask = key_mask.bool()
    if query.device.type == "cpu":
        backend = _CPUFlash
    elif query.device.type == "cuda" and query.dtype != torch.float64 and _cuda_backend_works(query.device, query.dtype):
        backend = _CUDAEfficient
    else:
        return bico_attention_reference(query, key, value, query_conj, key_conj, key_mask, scale)
    return _BicoFlashFunction.apply(query, key, value, query_conj, key_conj, key_mask, scale, backend)
