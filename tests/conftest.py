"""Test-session settings: the item cache goes to a throw-away folder, never the user's ~/.cache."""

from __future__ import annotations

import os
import tempfile

os.environ["MEDSSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="medssl-test-cache-")
