"""fastvmt: fast, training-free video motion transfer for video diffusion transformers (Wan2.1)."""
from fastvmt_kernels import __version__

__all__ = ["__version__"]
