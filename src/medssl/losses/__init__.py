"""medssl.losses."""
