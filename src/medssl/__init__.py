"""medssl."""
