"""Test configuration.

On CPU machines every Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set before triton is
imported). Set FASTVMT_GPU_TESTS=1 to run the same tests compiled on a CUDA device instead.

bf16 arithmetic in the interpreter operates on raw bit patterns (triton issue #11584), so its dot is
patched to upcast bf16 operands to fp32; kernels upcast bf16 after every load for elementwise math.
"""
import os

GPU_TESTS = os.environ.get("FASTVMT_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    _original_dot = _interp.InterpreterBuilder.create_dot

    def _upcast_bf16(handle):
        if getattr(handle.dtype, "scalar", handle.dtype) == tl.bfloat16:
            data = _interp._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return _interp.TensorHandle(data, tl.float32)
        return handle

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _original_dot(self, _upcast_bf16(a), _upcast_bf16(b), d, input_precision, max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = _create_dot

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device():
    """Device the kernel tests run on: CUDA under FASTVMT_GPU_TESTS=1, else CPU (interpreter)."""
    return torch.device("cuda" if GPU_TESTS else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
