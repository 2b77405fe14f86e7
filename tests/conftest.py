"""Test-wide settings: the Triton kernels run for real under the interpreter on CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
