"""Block-sparse spatiotemporal local attention (forward + backward)."""
from .interface import local_attention

__all__ = ["local_attention"]
