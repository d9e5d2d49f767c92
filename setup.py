"""fastvmt: fast, training-free video motion transfer with Triton block-sparse local attention."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "fastvmt_kernels" / "__init__.py").read_text()).group(1)

setup(
    name="fastvmt",
    version=VERSION,
    description="Fast training-free video motion transfer for video DiTs (Wan2.1) with hand-written Triton kernels",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastvmt", "fastvmt.*", "fastvmt_kernels", "fastvmt_kernels.*"]),
    package_data={"fastvmt": ["testbed/checkpoint/*", "testbed/checkpoint/*/*"]},
    include_package_data=True,
    # torch is pinned to the tested release; an unpinned torch pulls a multi-GB CUDA build on CPU machines.
    install_requires=[
        "torch==2.13.0",
        "triton==3.6.0",
        "numpy<2.4",
        "diffusers==0.42.1",
        "transformers>=5.17,<6",
        "accelerate",  # diffusers loads models with low_cpu_mem_usage (required with keep_in_fp32_modules)
        "safetensors",
        "imageio==2.38.1",
        "imageio-ffmpeg==0.8.1",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # peft: the LoRA tests (diffusers loads LoRAs through it)
        "test": ["pytest", "pytest-benchmark==5.3.1", "matplotlib", "peft==0.21.2"],
        "bench": ["pytest-benchmark==5.3.1", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastvmt=fastvmt.cli:main"]},
)
