"""fastvmt_kernels: Triton kernels for video motion transfer and block-sparse local attention.

Torch and Triton only. Public API:

- :func:`local_attention` / :func:`local_attention_mask`: spatiotemporal local-window attention.
- :func:`joint_local_attention`: the same inside a joint sequence with global (text) tokens (MMDiT-style DiTs).
- :class:`TileLayout`: the grid / tile / window geometry behind it.
- :func:`motion_flow`: coarse-to-fine local attention motion flow (FastVMT's AMF), forward + backward.
- :func:`fused_adamw_step`: one in-place AdamW update in a single kernel (gradient reuse).
"""
__version__ = "0.1.0"

from .layout import TileLayout, local_attention_mask
from .local_attention import joint_local_attention, local_attention
from .motion_flow import motion_flow
from .adamw import fused_adamw_step

__all__ = [
    "TileLayout",
    "fused_adamw_step",
    "joint_local_attention",
    "local_attention",
    "local_attention_mask",
    "motion_flow",
    "__version__",
]
