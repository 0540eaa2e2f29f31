"""Pallas kernels behind `layers.attention`'s switch (`--attention=pallas`)."""
from easytune.kernels.flash_attention import SUPPORTED_HEAD_DIMS, BlockSizes, flash_attention

__all__ = ["flash_attention", "BlockSizes", "SUPPORTED_HEAD_DIMS"]
