"""Attention motion flow: fused coarse-to-fine windowed soft-argmax (forward + backward) and its reference."""
from .geometry import FlowGeometry, make_pairs
from .interface import motion_flow

__all__ = ["FlowGeometry", "make_pairs", "motion_flow"]
