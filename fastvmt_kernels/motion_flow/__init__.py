"""Attention motion flow: fused coarse-to-fine windowed soft-argmax (forward + backward) and its reference."""
from .geometry import FlowGeometry, make_pairs
from .interface import HEAD_REDUCTIONS, motion_flow, reduce_heads

__all__ = ["HEAD_REDUCTIONS", "FlowGeometry", "make_pairs", "motion_flow", "reduce_heads"]
