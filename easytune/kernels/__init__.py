"""Pallas kernels behind `layers.attention`'s switch: `--attention=pallas` (GPU, easytune's own
kernel) and `--attention=splash` (TPU, JAX's splash attention with easytune's semantics)."""
from easytune.kernels.flash_attention import SUPPORTED_HEAD_DIMS, BlockSizes, flash_attention
from easytune.kernels.tpu_attention import for_export, tpu_flash_attention

__all__ = ["flash_attention", "BlockSizes", "SUPPORTED_HEAD_DIMS", "tpu_flash_attention", "for_export"]
