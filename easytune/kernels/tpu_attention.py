"""Fused attention on TPU: JAX's own Pallas TPU splash attention behind easytune's semantics.

`tpu_flash_attention` has `flash_attention`'s signature and meaning (causal, packed segments with
segment 0 as padding, GQA/MQA without repeating K/V, a sliding window, any length, bf16/fp32, per
shard under the ('dp','fsdp','mp') mesh). It wraps `jax.experimental.pallas.ops.tpu.
splash_attention` (what MaxText runs) rather than a kernel of our own, because splash already has
what a TPU flash kernel needs (block-sparse masks computed ahead of time, so fully masked blocks are
never loaded; separate dQ and dK/dV kernels; Mosaic layouts); what easytune adds is the mapping:

- layout: ours is `[batch, seq, heads, head_dim]`, splash's `[heads, seq, head_dim]` per example;
  we transpose and vmap over the batch. splash's MHA kernel takes fewer K/V heads than query heads
  (GQA, MQA) as they are.
- scaling: splash computes `softmax(q k^T) v`; q is multiplied by 1/sqrt(head_dim) first.
- masks: causal is splash's `CausalMask`; a window w is `LocalMask((w - 1, 0))` (causal) or
  `LocalMask((w - 1, None))` (not causal), i.e. `q - k < w` as `layers.attention_mask`.
- segments: splash attends within equal segment ids, so real tokens never see segment 0, but
  padding (segment 0) rows attend to each other; easytune's rule is that padding rows output 0, so
  the output is multiplied by `segment_ids != 0` (which also zeroes their gradients).
- lengths: splash wants the length a multiple of its blocks (>= 128, the TPU lane width); inputs
  are padded at the end with segment 0 and the output sliced back.
- head_dim: splash is used with lane-aligned head dimensions (multiples of 128; users of it on TPU
  report that others fail to compile, and Mosaic is not available here to say otherwise), so other
  head dims (64 in SmolLM2 and LLaMA-3.2-1B) are zero-padded up to the next multiple of 128: exact
  (the padded columns add 0 to q k^T and give output columns that are sliced away), at the cost of
  the padded columns' FLOPs.

On CPU the kernel runs in Pallas' TPU interpret mode (`interpret=None` picks it there; per shard
under a multi-device mesh, the generic Pallas interpreter): slow, for tests. `for_export("tpu")`
makes `interpret=None` mean "compile for TPU" while tracing on a CPU, so a train step with
`attention='splash'` can be `jax.export`ed for TPU here.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from easytune.kernels.flash_attention import _shard_per_device, check_supported

LANES = 128
BLOCK_CHOICES = (512, 256, 128)  # the largest that divides the padded length (MaxText's default is 512)

_export_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("easytune_export_platform", default=None)


@contextlib.contextmanager
def for_export(platform: str):
    """While tracing inside this block, `interpret=None` compiles the kernel for `platform` (e.g.
    'tpu') instead of picking interpret mode on a CPU host: for `jax.export(..., platforms=[...])`.
    The choice is made at trace time and is not part of jit's cache key: export a jitted function
    that was not already traced (and run) outside the block."""
    token = _export_platform.set(platform)
    try:
        yield
    finally:
        _export_platform.reset(token)


def _interpreter(interpret: bool | None) -> str | None:
    """None (compile for TPU), "tpu" (Pallas' TPU interpreter: TPU memory spaces and DMA semantics
    simulated) or "generic" (the kernel discharged into plain XLA ops). Under a mesh of several
    devices the TPU interpreter hangs on this CPU (its io_callbacks from the 8 simulated devices'
    shards never return: jax 0.10.2), so per-shard runs use the generic one; one device uses TPU's."""
    if interpret is not None and not interpret:
        return None
    target = "cpu" if interpret else (_export_platform.get() or jax.default_backend())
    check_platform(target)
    if target == "tpu":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    return "generic" if not mesh.empty and mesh.size > 1 else "tpu"


def check_platform(platform: str) -> None:
    """One-sentence ValueError unless splash can run on `platform`: TPU, or CPU in interpret mode."""
    if platform not in ("tpu", "cpu"):
        raise ValueError(f"attention='splash' is the TPU kernel and cannot run on {platform}; use attention='pallas' "
                         f"or 'cudnn' on GPU, or 'xla' anywhere.")


def _padded_head_dim(head_dim: int) -> int:
    return head_dim if head_dim % LANES == 0 else -(-head_dim // LANES) * LANES


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, seq: int, causal: bool, window: int | None, block: int, interpreter: str | None,
            softcap: float | None = None):
    """A splash MHA kernel for one example `[heads, seq, head_dim]` (built once per shape: the
    block-sparsity tables are numpy work at trace time)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    shape = (seq, seq)
    if window is not None:
        one = masks.LocalMask(shape, window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = masks.CausalMask(shape)
    else:
        one = masks.FullMask(shape)
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                                      q_seq_shards=1, attn_logits_soft_cap=softcap,
                                      interpret={None: False, "generic": True, "tpu": pltpu.InterpretParams()}[interpreter])


def _local_splash(q, k, v, segment_ids, *, causal, sliding_window, scale, logit_softcap, block, interpreter):
    """tpu_flash_attention on one device's arrays `[batch, seq, heads, head_dim]`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    batch, seq, heads, head_dim = q.shape
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim) if scale is None else scale, q.dtype)  # splash does not scale
    padded_dim = _padded_head_dim(head_dim)
    if block is None:
        padded_len = -(-seq // LANES) * LANES
        block = next(b for b in BLOCK_CHOICES if padded_len % b == 0)
    else:
        padded_len = -(-seq // block) * block
    if segment_ids is None and padded_len != seq:
        segment_ids = jnp.ones((batch, seq), jnp.int32)
    pad = [(0, 0), (0, padded_len - seq), (0, 0), (0, padded_dim - head_dim)]
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))  # [batch, heads, seq, dim]
    kernel = _kernel(heads, padded_len, bool(causal), sliding_window, block, interpreter,
                     None if logit_softcap is None else float(logit_softcap))
    # Over the batch: vmap (on TPU a parallel grid axis). Pallas' TPU interpreter does not extend its
    # grid semantics under vmap (jax 0.10.2: "safe_zip() argument 1 has length 3 but argument 0 has
    # length 4"), so it maps over the examples one by one instead.
    if interpreter == "tpu":
        def over_batch(f, *xs):
            return jax.lax.map(lambda args: f(*args), xs)
    else:
        def over_batch(f, *xs):
            return jax.vmap(f)(*xs)
    if segment_ids is None:
        out = over_batch(lambda q, k, v: kernel(q, k, v), q, k, v)
    else:
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded_len - seq)])
        out = over_batch(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)), q, k, v, segment_ids)
        out = out * (segment_ids != 0)[:, None, :, None].astype(out.dtype)  # padding rows output 0
    return out.transpose(0, 2, 1, 3)[:, :seq, :, :head_dim]


def tpu_flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sliding_window: int | None = None,
                        scale: float | None = None, logit_softcap: float | None = None,
                        block_size: int | None = None, interpret: bool | None = None):
    """Fused attention on TPU (JAX's splash attention), with `flash_attention`'s semantics:
    `softmax(q k^T / sqrt(head_dim)) v`, float32 softmax, output in q's dtype.

    q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]` (GQA/MQA: heads a
    multiple of kv_heads). segment_ids: `[batch, seq]` ints or None; attention stays within a
    segment and segment 0 is padding (never attended; its rows output 0 with zero gradients).
    sliding_window: a query attends to keys fewer than this many tokens back. scale replaces
    1/sqrt(head_dim) (applied to q); logit_softcap is splash's `attn_logits_soft_cap`. Any seq (padded to the
    block inside), any head_dim (padded to a multiple of 128 inside), bfloat16 or float32 (float16 passes
    the checks but is untested: TPUs before v5 have no float16 matmul). Differentiable (splash's own
    backward kernels). Under a ('dp','fsdp','mp') mesh (`jax.set_mesh`) it runs per shard: batch
    over dp x fsdp, heads over mp. block_size: splash's q/kv tile (a multiple of 128; None picks
    512, 256 or 128 by length). interpret: None picks interpret mode on CPU (see `_interpreter`,
    `for_export`); True forces it.
    """
    check_supported(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype),
                    None if segment_ids is None else segment_ids.shape, sliding_window, head_dims=None)  # any: padded
    if block_size is not None and (block_size < LANES or block_size % LANES):
        raise ValueError(f"block_size must be a multiple of {LANES} (the TPU lane width), got {block_size}.")
    fn = functools.partial(_local_splash, causal=causal, sliding_window=None if sliding_window is None else int(sliding_window),
                           scale=scale, logit_softcap=logit_softcap, block=block_size, interpreter=_interpreter(interpret))
    return _shard_per_device(fn, q, k, v, segment_ids)


__all__ = ["tpu_flash_attention", "for_export", "check_platform"]
