"""medssl.methods."""
