"""Losses: pure functions / small modules taking tensors and returning a scalar tensor."""

from medssl.losses.infonce import info_nce

__all__ = ["info_nce"]
