"""Test setup: import the package from this checkout, and fix JAX's platform."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
