"""fastvmt_kernels: Triton kernels for video motion transfer and block-sparse local attention.

Torch and Triton only. Public API:

- :func:`local_attention` / :func:`local_attention_mask`: spatiotemporal local-window attention.
- :class:`TileLayout`: the grid / tile / window geometry behind it.
"""
__version__ = "0.1.0"

from .layout import TileLayout, local_attention_mask
from .local_attention import local_attention

__all__ = ["TileLayout", "local_attention", "local_attention_mask", "__version__"]
