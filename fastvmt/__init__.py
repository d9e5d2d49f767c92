"""fastvmt: fast, training-free video motion transfer for video diffusion transformers (Wan2.1 / 2.2)."""
import importlib

from ._version import __version__

# Public names imported on first use, so `import fastvmt` (and `fastvmt --help`) does not import diffusers.
_LAZY_EXPORTS = {
    "MotionTransferConfig": "fastvmt.config",
    "FastVMTPipeline": "fastvmt.pipeline",
    "FastVMTImageToVideoPipeline": "fastvmt.image_to_video",
    "apply_local_attention": "fastvmt.processors",
    "LocalAttnProcessor": "fastvmt.processors",
    "CogVideoXLocalAttnProcessor": "fastvmt.cogvideox",
    "HunyuanVideoLocalAttnProcessor": "fastvmt.hunyuan_video",
    "HunyuanVideo15LocalAttnProcessor": "fastvmt.hunyuan_video15",
    "LTXVideoLocalAttnProcessor": "fastvmt.ltx_video",
    "LTX2LocalAttnProcessor": "fastvmt.ltx2",
    "WanAnimateLocalAttnProcessor": "fastvmt.wan_animate",
    "SkyReelsV2LocalAttnProcessor": "fastvmt.skyreels_v2",
    "QKCaptureProcessor": "fastvmt.processors",
    "attention_phase": "fastvmt.processors",
    "load_video": "fastvmt.video_io",
    "write_video": "fastvmt.video_io",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastvmt' has no attribute {name!r}")
