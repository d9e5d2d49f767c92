"""Block-sparse spatiotemporal local attention (forward + backward), alone or inside a joint text+video sequence."""
from .interface import local_attention
from .joint import joint_local_attention

__all__ = ["joint_local_attention", "local_attention"]
