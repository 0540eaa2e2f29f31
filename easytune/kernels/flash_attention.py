"""Flash attention in Pallas: causal, GQA/MQA, packed segments and a sliding window, with its own
backward pass; the `[seq, seq]` score matrix never exists in memory.

Layout as `jax.nn.dot_product_attention`: q `[batch, seq, heads, head_dim]`, k and v
`[batch, seq, kv_heads, head_dim]`. q and k/v are the same tokens (self-attention: training, eval,
a prefill into an empty cache), so causality and the window are judged on the index in the
sequence. That equals easytune's position rule (`layers.attention_mask`) whenever positions rise by
one per token inside each segment, as packing and left-padded prompts make them.

How it runs (FlashAttention-2): the grid is (query blocks, batch, heads), query blocks first so
that programs launched together share K/V in L2; each program keeps its query block on chip and
walks the key blocks it can see, with an online softmax in float32 (base 2: the log2(e) factor is
folded into the softmax scale). Key blocks wholly above the diagonal,
wholly outside the window, or (with segment ids) holding no segment of the query block are never
visited; blocks wholly inside the visible region skip the mask arithmetic. The backward pass is
two kernels: dK/dV over key blocks (each program loops over the query heads of its KV head, so K
and V are never repeated for GQA) and dQ over query blocks.

Backends: GPU through Pallas' Triton lowering; CPU in interpret mode (chosen automatically; slow,
for tests). TPU (Mosaic) is not supported: that lowering wants a different kernel shape (grid over
key blocks with VMEM scratch accumulators, lane-aligned 2-D segment ids), so on TPU use
`attention='xla'`, which is what `'auto'` picks there.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

# A large finite negative (as layers.MASK_VALUE): masked scores stay finite, so no inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2_E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
MIN_BLOCK = 16  # Triton's dot needs every tile dimension >= 16
BATCH_AXES = ("dp", "fsdp")
HEAD_AXIS = "mp"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16). Forward: `block_q` x `block_k`; dK/dV kernel:
    `block_q_dkv` x `block_k_dkv`; dQ kernel: `block_q_dq` x `block_k_dq`. The defaults follow the
    Triton fused-attention tutorial for A100/H100 (big tiles on the dimension a program owns,
    small ones on the dimension it loops over); they are a starting point, not tuned here."""

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 32
    num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8
    num_stages: int = 3

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        if head_dim >= 256:  # shared memory: q, k, v tiles of 256 columns
            return cls(64, 32, 32, 64, 64, 32, num_stages=2)
        return cls()

    def all_blocks(self) -> tuple[int, ...]:
        return (self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv, self.block_q_dq, self.block_k_dq)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (hashable: a non-differentiable custom_vjp argument)."""

    causal: bool
    window: int | None
    seq_len: int        # real length; inputs are padded to a multiple of every block
    sm_scale: float     # scores are q k^T * sm_scale (1/sqrt(head_dim) unless the model says otherwise)
    softcap: float | None  # then softcap * tanh(scores / softcap) (Gemma 2), None: no cap
    blocks: BlockSizes
    interpret: bool


# ----------------------------------------------------------------------------- validation

def check_supported(q_shape, k_shape, v_shape, dtypes=(), segment_shape=None, sliding_window=None,
                    head_dims=SUPPORTED_HEAD_DIMS) -> None:
    """Raise a one-sentence ValueError when the kernel cannot run these shapes (`head_dims`: the
    head dimensions it takes; None leaves that check to the caller)."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise ValueError(f"flash_attention wants q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, "
                         f"head_dim]; got q {tuple(q_shape)} and k {tuple(k_shape)}.")
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"k and v must have the same shape; got {tuple(k_shape)} and {tuple(v_shape)}.")
    batch, seq, heads, head_dim = q_shape
    if (k_shape[0], k_shape[1], k_shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"flash_attention is self-attention: k and v need q's batch, length and head_dim "
                         f"{(batch, seq, head_dim)}, got {(k_shape[0], k_shape[1], k_shape[3])}.")
    if heads % k_shape[2]:
        raise ValueError(f"the number of query heads ({heads}) must be a multiple of the number of key/value "
                         f"heads ({k_shape[2]}).")
    if head_dims is not None and head_dim not in head_dims:
        raise ValueError(f"the Pallas attention kernel supports head_dim {SUPPORTED_HEAD_DIMS}, not {head_dim}; "
                         f"use attention='xla' for this model.")
    for dtype in dtypes:
        if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"the Pallas attention kernel supports bfloat16, float16 and float32 inputs, "
                             f"not {jnp.dtype(dtype).name}.")
    if len(set(jnp.dtype(d) for d in dtypes)) > 1:
        raise ValueError(f"q, k and v must share one dtype; got {[jnp.dtype(d).name for d in dtypes]}.")
    if segment_shape is not None and tuple(segment_shape) != (batch, seq):
        raise ValueError(f"segment_ids must be [batch, seq] = {(batch, seq)}, got {tuple(segment_shape)}.")
    if sliding_window is not None and (not isinstance(sliding_window, numbers.Integral) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}.")


def _use_interpret(interpret: bool | None) -> bool:
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend == "tpu":
        raise ValueError("the easytune Pallas attention kernel has no TPU (Mosaic) lowering; on TPU use "
                         "attention='splash' (what attention='auto' picks there) or 'xla'.")
    return interpret


# ----------------------------------------------------------------------------- in-kernel helpers

def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
    """2-D matmul with float32 accumulation; contracting dims chosen so no transpose is materialized."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(q_index, kv_index, q_segments, kv_segments, *, causal, window, seq_len):
    """`[block_q, block_k]` (or broadcastable) booleans: which keys each query may attend to."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if q_segments is not None:
        mask = (q_segments[:, None] == kv_segments[None, :]) & (kv_segments[None, :] != 0)
    if causal:
        mask = both(mask, q_index[:, None] >= kv_index[None, :])
    if window is not None:
        mask = both(mask, q_index[:, None] - kv_index[None, :] < window)
    if seq_len is not None:  # keys in the padding past the real length
        mask = both(mask, kv_index[None, :] < seq_len)
    return mask


def _kv_block_range(q_start, *, block_q, block_k, num_kv_blocks, causal, window, seq_len):
    """Key blocks `[lo, hi)` any query of the block `[q_start, q_start + block_q)` may see, and the
    part `[full_lo, full_hi)` in which no key is masked for any of those queries."""
    q_last = q_start + block_q - 1
    hi, full_hi, lo, full_lo = num_kv_blocks, seq_len // block_k, 0, 0
    if causal:
        hi = jnp.minimum(hi, lax.div(q_last, block_k) + 1)            # keys <= q_last
        full_hi = jnp.minimum(full_hi, lax.div(q_start + 1, block_k))  # the whole block <= q_start
    if window is not None:
        lo = lax.div(jnp.maximum(q_start - window + 1, 0), block_k)            # keys > q_start - window
        full_lo = lax.div(jnp.maximum(q_last - window + block_k, 0), block_k)  # the whole block > q_last - window
    full_lo = jnp.minimum(jnp.maximum(full_lo, lo), hi)
    full_hi = jnp.minimum(jnp.maximum(full_hi, full_lo), hi)
    return lo, hi, full_lo, full_hi


def _q_block_range(k_start, *, block_q, block_k, num_q_blocks, causal, window, seq_len):
    """Query blocks `[lo, hi)` that may see any key of the block `[k_start, k_start + block_k)`, and
    the part `[full_lo, full_hi)` in which every query sees every key of it."""
    k_last = k_start + block_k - 1
    lo, full_lo, hi, full_hi = 0, 0, num_q_blocks, num_q_blocks
    if causal:
        lo = lax.div(k_start, block_q)                        # queries >= k_start
        full_lo = lax.div(k_last + block_q - 1, block_q)      # the whole block >= k_last
    if window is not None:
        hi = jnp.minimum(hi, lax.div(k_last + window - 1, block_q) + 1)  # queries < k_last + window
        full_hi = lax.div(k_start + window, block_q)                      # the whole block < k_start + window
    if seq_len % block_k:  # a key block reaching into the padding is masked everywhere
        # (arithmetic, not jnp.where: Pallas-Triton gives a scalar where's weak literal the predicate's i1 type)
        full_hi = full_hi * (k_last < seq_len).astype(jnp.int32)
    full_lo = jnp.minimum(jnp.maximum(full_lo, lo), hi)
    full_hi = jnp.minimum(jnp.maximum(full_hi, full_lo), hi)
    return lo, hi, full_lo, full_hi


def _loop(lo, hi, full_lo, full_hi, body, carry, has_segments):
    """Run `body(block, carry, masked)` over `[lo, hi)`, unmasked inside `[full_lo, full_hi)`.
    With segment ids every block is masked (packing can cut anywhere)."""
    if has_segments:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _scores(q, k, st: _Static):
    """Scores of a q block against a k block in log2 units (the kernels use exp2), and for a
    soft-capped model the cap's derivative `1 - tanh^2` that the backward kernels multiply in."""
    if st.softcap is None:
        return _dot(q, k, 1, 1) * (st.sm_scale * LOG2_E), None
    t = jnp.tanh(_dot(q, k, 1, 1) * (st.sm_scale / st.softcap))
    return (st.softcap * LOG2_E) * t, 1.0 - t * t


# ----------------------------------------------------------------------------- kernels

def _forward_kernel(*refs, st: _Static, has_segments: bool):
    if has_segments:
        q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), seg_ref = refs, None
    block_q, block_k = st.blocks.block_q, st.blocks.block_k
    i = pl.program_id(0)
    q_start = i * block_q
    q = q_ref[...]
    q_index = q_start + jnp.arange(block_q)
    q_segments = seg_ref[pl.ds(q_start, block_q)] if has_segments else None

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s, _ = _scores(q, k, st)
        if masked:
            kv_segments = seg_ref[pl.ds(k_start, block_k)] if has_segments else None
            mask = _mask(q_index, k_start + jnp.arange(block_k), q_segments, kv_segments, causal=st.causal,
                         window=st.window, seq_len=None if has_segments or st.seq_len % block_k == 0 else st.seq_len)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    num_kv_blocks = pl.cdiv(st.seq_len, block_k)
    lo, hi, full_lo, full_hi = _kv_block_range(q_start, block_q=block_q, block_k=block_k, num_kv_blocks=num_kv_blocks,
                                               causal=st.causal, window=st.window, seq_len=st.seq_len)
    if has_segments:
        lo, hi = jnp.maximum(lo, lo_ref[i]), jnp.minimum(hi, hi_ref[i])
    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    acc, m, l = _loop(lo, hi, full_lo, full_hi, body, carry, has_segments)
    # A query that saw no key (padding) still has m == MASK_VALUE: output 0, and an lse so large
    # that the backward pass gives it probability 0 everywhere.
    seen = m > 0.5 * MASK_VALUE
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l), -MASK_VALUE)


def _dkdv_kernel(*refs, st: _Static, groups: int, has_segments: bool):
    if has_segments:
        q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), seg_ref = refs, None
    block_q, block_k = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    j = pl.program_id(0)
    k_start = j * block_k
    k, v = k_ref[...], v_ref[...]
    kv_index = k_start + jnp.arange(block_k)
    kv_segments = seg_ref[pl.ds(k_start, block_k)] if has_segments else None

    def body(i, carry, masked, head):
        dk, dv = carry
        q_start = i * block_q
        q = q_ref[pl.ds(q_start, block_q), head, :]
        do = do_ref[pl.ds(q_start, block_q), head, :]
        lse = lse_ref[head, pl.ds(q_start, block_q)]
        delta = delta_ref[head, pl.ds(q_start, block_q)]
        s, cap_grad = _scores(q, k, st)
        if masked:
            q_segments = seg_ref[pl.ds(q_start, block_q)] if has_segments else None
            mask = _mask(q_start + jnp.arange(block_q), kv_index, q_segments, kv_segments, causal=st.causal,
                         window=st.window, seq_len=None if has_segments or st.seq_len % block_k == 0 else st.seq_len)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])                 # [block_q, block_k]
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)   # p^T do
        dp = _dot(do, v, 1, 1)                         # do v^T
        ds = p * (dp - delta[:, None])
        if cap_grad is not None:
            ds = ds * cap_grad
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)    # ds^T q
        return dk, dv

    num_q_blocks = q_ref.shape[0] // block_q
    lo, hi, full_lo, full_hi = _q_block_range(k_start, block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks,
                                              causal=st.causal, window=st.window, seq_len=st.seq_len)
    if has_segments:
        lo, hi = jnp.maximum(lo, lo_ref[j]), jnp.minimum(hi, hi_ref[j])

    def per_head(head, carry):  # every query head sharing this KV head adds to its dK, dV
        return _loop(lo, hi, full_lo, full_hi, functools.partial(body, head=head), carry, has_segments)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, per_head, (zeros, zeros))
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: _Static, has_segments: bool):
    if has_segments:
        q_ref, k_ref, v_ref, seg_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), seg_ref = refs, None
    block_q, block_k = st.blocks.block_q_dq, st.blocks.block_k_dq
    i = pl.program_id(0)
    q_start = i * block_q
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_index = q_start + jnp.arange(block_q)
    q_segments = seg_ref[pl.ds(q_start, block_q)] if has_segments else None

    def body(j, dq, masked):
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s, cap_grad = _scores(q, k, st)
        if masked:
            kv_segments = seg_ref[pl.ds(k_start, block_k)] if has_segments else None
            mask = _mask(q_index, k_start + jnp.arange(block_k), q_segments, kv_segments, causal=st.causal,
                         window=st.window, seq_len=None if has_segments or st.seq_len % block_k == 0 else st.seq_len)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        if cap_grad is not None:
            ds = ds * cap_grad
        return dq + _dot(ds.astype(k.dtype), k)

    num_kv_blocks = pl.cdiv(st.seq_len, block_k)
    lo, hi, full_lo, full_hi = _kv_block_range(q_start, block_q=block_q, block_k=block_k, num_kv_blocks=num_kv_blocks,
                                               causal=st.causal, window=st.window, seq_len=st.seq_len)
    if has_segments:
        lo, hi = jnp.maximum(lo, lo_ref[i]), jnp.minimum(hi, hi_ref[i])
    dq = _loop(lo, hi, full_lo, full_hi, body, jnp.zeros(q.shape, jnp.float32), has_segments)
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls

def _segment_block_ranges(segment_ids, block_rows: int, block_cols: int):
    """For each block of `block_rows` tokens, the hull `[first, last)` of the blocks of
    `block_cols` tokens whose segment ids could equal one of its own (non-padding) ids: `[batch,
    row_blocks]` each. Judged on [min, max] intervals, so it never drops a needed block, and for
    packed rows (segments in order) it is exact: attention skips the other examples' blocks."""
    batch, seq = segment_ids.shape
    big = jnp.iinfo(jnp.int32).max

    def interval(block):
        ids = segment_ids.reshape(batch, seq // block, block)
        return jnp.where(ids == 0, big, ids).min(-1), jnp.where(ids == 0, -1, ids).max(-1)

    row_min, row_max = interval(block_rows)
    col_min, col_max = interval(block_cols)
    overlap = (col_min[:, None, :] <= row_max[:, :, None]) & (row_min[:, :, None] <= col_max[:, None, :])
    num_cols = seq // block_cols
    cols = jnp.arange(num_cols, dtype=jnp.int32)
    first = jnp.min(jnp.where(overlap, cols, num_cols), axis=-1)
    last = jnp.max(jnp.where(overlap, cols + 1, 0), axis=-1)
    return first.astype(jnp.int32), last.astype(jnp.int32)


def _compiler_params(st: _Static, head_dim: int):
    if st.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    num_warps = st.blocks.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=st.blocks.num_stages)


def _forward(q, k, v, segment_ids, st: _Static):
    """Padded inputs -> (out `[b, s, h, d]`, lse `[b, h, s]` float32, base 2)."""
    batch, seq, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    block_q, block_k = st.blocks.block_q, st.blocks.block_k
    has_segments = segment_ids is not None
    in_specs = [
        pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, groups), 0)),
        pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, groups), 0)),
    ]
    args = [q, k, v]
    if has_segments:
        lo, hi = _segment_block_ranges(segment_ids, block_q, block_k)
        num_q_blocks = seq // block_q
        in_specs += [pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),
                     pl.BlockSpec((None, num_q_blocks), lambda i, b, h: (b, 0)),
                     pl.BlockSpec((None, num_q_blocks), lambda i, b, h: (b, 0))]
        args += [segment_ids, lo, hi]
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, st=st, has_segments=has_segments),
        grid=(seq // block_q, batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
        compiler_params=_compiler_params(st, head_dim),
        interpret=st.interpret,
        name="easytune_flash_forward",
    )(*args)
    return out, lse


def _backward(q, k, v, segment_ids, out, lse, do, st: _Static):
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    has_segments = segment_ids is not None
    # delta_i = sum_d o_id * do_id: one fused elementwise pass, no kernel needed.
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    params = _compiler_params(st, head_dim)

    bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    in_specs = [
        pl.BlockSpec((None, seq, groups, head_dim), lambda j, b, g: (b, 0, g, 0)),  # the group's query heads
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, g: (b, j, g, 0)),
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, g: (b, j, g, 0)),
    ]
    args = [q, k, v]
    if has_segments:
        lo, hi = _segment_block_ranges(segment_ids, bk, bq)
        in_specs += [pl.BlockSpec((None, seq), lambda j, b, g: (b, 0)),
                     pl.BlockSpec((None, seq // bk), lambda j, b, g: (b, 0)),
                     pl.BlockSpec((None, seq // bk), lambda j, b, g: (b, 0))]
        args += [segment_ids, lo, hi]
    in_specs += [pl.BlockSpec((None, seq, groups, head_dim), lambda j, b, g: (b, 0, g, 0)),
                 pl.BlockSpec((None, groups, seq), lambda j, b, g: (b, g, 0)),
                 pl.BlockSpec((None, groups, seq), lambda j, b, g: (b, g, 0))]
    args += [do, lse, delta]
    kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, g: (b, j, g, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, groups=groups,
                          has_segments=has_segments),
        grid=(seq // bk, batch, kv_heads),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=st.interpret,
        name="easytune_flash_backward_dkdv",
    )(*args)

    bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [q_spec,
                pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, groups), 0)),
                pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, groups), 0))]
    args = [q, k, v]
    if has_segments:
        lo, hi = _segment_block_ranges(segment_ids, bq, bk)
        in_specs += [pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),
                     pl.BlockSpec((None, seq // bq), lambda i, b, h: (b, 0)),
                     pl.BlockSpec((None, seq // bq), lambda i, b, h: (b, 0))]
        args += [segment_ids, lo, hi]
    in_specs += [q_spec, row_spec, row_spec]
    args += [do, lse, delta]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, has_segments=has_segments),
        grid=(seq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=st.interpret,
        name="easytune_flash_backward_dq",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, st: _Static):
    return _forward(q, k, v, segment_ids, st)[0]


def _flash_fwd(q, k, v, segment_ids, st: _Static):
    out, lse = _forward(q, k, v, segment_ids, st)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(st: _Static, residuals, do):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, do, st)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public

def _fit_blocks(blocks: BlockSizes, seq: int) -> BlockSizes:
    """Shrink blocks longer than the (power-of-two rounded) sequence; check they are powers of two."""
    for size in blocks.all_blocks():
        if size < MIN_BLOCK or size & (size - 1):
            raise ValueError(f"block sizes must be powers of two >= {MIN_BLOCK}, got {blocks}.")
    cap = max(MIN_BLOCK, pl.next_power_of_2(seq))
    return dataclasses.replace(blocks, **{f.name: min(getattr(blocks, f.name), cap)
                                          for f in dataclasses.fields(blocks) if f.name.startswith("block_")})


def _local_flash_attention(q, k, v, segment_ids, *, causal, sliding_window, scale, logit_softcap, block_sizes,
                           interpret):
    """flash_attention on arrays of one device: pad to the blocks, run, slice."""
    seq, head_dim = q.shape[1], q.shape[3]
    blocks = _fit_blocks(block_sizes or BlockSizes.for_head_dim(head_dim), seq)
    padded = -(-seq // max(blocks.all_blocks())) * max(blocks.all_blocks())
    window = None if sliding_window is None else int(sliding_window)
    st = _Static(causal=bool(causal), window=window, seq_len=seq, blocks=blocks, interpret=interpret,
                 sm_scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
                 softcap=None if logit_softcap is None else float(logit_softcap))
    if padded != seq:
        pad = [(0, 0), (0, padded - seq), (0, 0), (0, 0)]
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        if segment_ids is not None:  # padding is segment 0: never attended
            segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - seq)])
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    out = _flash(q, k, v, segment_ids, st)
    return out[:, :seq]


def _shard_per_device(fn, q, k, v, segment_ids):
    """Run `fn` per shard under the ambient ('dp','fsdp','mp') mesh (batch over dp x fsdp, heads
    over mp); plain call outside a mesh. Dimensions a mesh axis does not divide stay replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(name in mesh.axis_names for name in (*BATCH_AXES, HEAD_AXIS)) or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    batch, _, heads, _ = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    mp = mesh.shape[HEAD_AXIS]
    batch_axes = BATCH_AXES if batch % (mesh.shape["dp"] * mesh.shape["fsdp"]) == 0 else None
    head_axis = HEAD_AXIS if heads % mp == 0 else None
    local_heads = heads // mp
    kv_axis, kv_slice = head_axis, None
    if head_axis is not None and kv_heads % mp:
        if groups % local_heads == 0:  # e.g. MQA: all of a shard's query heads share one KV head
            kv_axis, kv_slice = None, 1
        else:
            head_axis = kv_axis = None
    q_spec, kv_spec = P(batch_axes, None, head_axis, None), P(batch_axes, None, kv_axis, None)

    def local(q, k, v, *segments):
        if kv_slice is not None:
            start = lax.axis_index(HEAD_AXIS) * local_heads // groups
            k, v = (lax.dynamic_slice_in_dim(x, start, kv_slice, axis=2) for x in (k, v))
        return fn(q, k, v, segments[0] if segments else None)

    args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(P(batch_axes, None))
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(*args)


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sliding_window: int | None = None,
                    scale: float | None = None, logit_softcap: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """Fused attention `softmax(q k^T / sqrt(head_dim)) v` with float32 softmax; output in q's dtype.
    scale replaces 1/sqrt(head_dim); logit_softcap caps the scaled scores to
    `logit_softcap * tanh(scores / logit_softcap)` before masking (Gemma 2), forward and backward.

    q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]` (heads a multiple
    of kv_heads: GQA, MQA). segment_ids: `[batch, seq]` int or None; tokens attend only within
    their segment and segment 0 is padding (attended by nothing; its rows output 0 with zero
    gradients). sliding_window: a query attends to keys less than this many tokens back. Any seq
    (padded inside to the block size); head_dim 64, 128 or 256; bfloat16, float16 or float32.
    Differentiable (custom VJP). Under a ('dp','fsdp','mp') mesh (`jax.set_mesh`) it runs per
    shard. interpret: None picks interpret mode on CPU.
    """
    check_supported(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype),
                    None if segment_ids is None else segment_ids.shape, sliding_window)
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap!r}.")
    fn = functools.partial(_local_flash_attention, causal=causal, sliding_window=sliding_window, scale=scale,
                           logit_softcap=logit_softcap, block_sizes=block_sizes, interpret=_use_interpret(interpret))
    return _shard_per_device(fn, q, k, v, segment_ids)
