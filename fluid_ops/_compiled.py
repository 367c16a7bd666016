"""The compiled boundary: load fluid_ops._C / _C_cuda and turn torch tensors into the
(data_ptr, dtype_code, shape, strides) tuples the kernels take. Nothing else in the package
touches the extension modules directly."""
from __future__ import annotations

import torch

# Codes of csrc/common/tensor.h (enum class DType). Keep in sync.
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.bool: 6,
    torch.uint8: 7,
}

try:
    from fluid_ops import _C as cpu  # noqa: N812
    cpu_error = None
except ImportError as e:  # not built (e.g. running from a source tree without a build)
    cpu, cpu_error = None, f"fluid_ops._C did not import: {e}"

try:
    from fluid_ops import _C_cuda as cuda  # noqa: N812
    cuda_error = None
except ImportError as e:
    cuda, cuda_error = None, f"fluid_ops._C_cuda did not import (built without nvcc?): {e}"


def view(t: torch.Tensor | None):
    """A tensor as the kernels see it; None stays None (optional arguments).

    The tuple holds a raw pointer and no reference: keep the tensor itself alive in a local
    variable until the kernel returns. `view(x.contiguous())` inline frees the copy before the
    call and the kernel reads freed memory."""
    if t is None:
        return None
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], tuple(t.shape), tuple(t.stride()))


def cpu_threads() -> int:
    """Kernels use as many threads as torch does, so torch.set_num_threads governs both."""
    return max(1, torch.get_num_threads())


def cuda_stream(device: torch.device) -> int:
    """The caller's current stream on `device`, as the integer handle the CUDA module takes."""
    return torch.cuda.current_stream(device).cuda_stream


def cuda_device_status() -> tuple[int, str]:
    if cuda is None:
        return 0, cuda_error
    return tuple(cuda.device_status())
