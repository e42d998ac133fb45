"""What was built and loaded: which implementation of the compiled modules is in use.

A leaf module (imports nothing of ingestd at import time) so that the command
line and the metrics collector can both ask without importing each other.
"""

from __future__ import annotations


def codec_implementation() -> str:
    """Which packet codec is loaded: 'cython' when the compiled extension is in use."""
    from ingestd import _codec

    path = getattr(_codec, "__file__", "") or ""
    return "cython" if path.endswith((".so", ".pyd")) else "python"
