"""Dtype names accepted on the command line and in `easytune.load`."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16,
}


def parse_dtype(name) -> jnp.dtype:
    """`'bf16'` -> `jnp.bfloat16`; a dtype passes through. Unknown names get a clear error."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    try:
        return jnp.dtype(DTYPES[name.lower()])
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; use one of float32 (fp32), bfloat16 (bf16), float16 (fp16)."
        ) from None


def dtype_name(dtype) -> str:
    """Canonical name (`'bfloat16'`) of a dtype or dtype name."""
    return jnp.dtype(parse_dtype(dtype)).name
