"""medssl.nn."""
