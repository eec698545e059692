"""Where the sessions run and the recurrent state lives: the seam between the runtime and an execution provider.

A device gives the runtime four things: the onnxruntime provider list, zero-filled OrtValues of a shape and dtype
(the state buffers and I/O buffers bound with IOBinding), a host (numpy) view or copy of an OrtValue, and an in-place
upload of a host array into an OrtValue. :class:`CpuDevice` is here; the CUDA one lives in ``mamba_runtime.gpu``
(``CudaDevice``, same members) and is imported only when asked for. ``name`` is also the IOBinding device type ("cpu",
"cuda") of the values the device allocates.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import GenerationInputError


class CpuDevice:
    """onnxruntime's CPU execution provider; OrtValues wrap numpy arrays, so host views cost nothing."""

    name = "cpu"

    def providers(self) -> list:
        return ["CPUExecutionProvider"]

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype))

    def to_host(self, value: ort.OrtValue) -> np.ndarray:
        """A numpy array of ``value``: a view on CPU (copy it to keep it past the next run)."""
        return value.numpy()

    def upload(self, value: ort.OrtValue, array: np.ndarray) -> None:
        """Copy ``array`` (same shape and dtype) into ``value``."""
        np.copyto(value.numpy(), array)


def select_device(provider: str):
    """The device for ``provider``: "cpu", "cuda", or "auto" (CUDA when this onnxruntime has it, else CPU).

    Raises:
        GenerationInputError: an unknown provider name, or "cuda" where it is not available.
    """
    if provider not in ("cpu", "cuda", "auto"):
        raise GenerationInputError(f"provider must be one of cpu, cuda, auto; found {provider!r}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cpu" or (provider == "auto" and not has_cuda):
        return CpuDevice()
    if not has_cuda:
        raise GenerationInputError(
            "provider cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu), use --provider cpu"
        )
    try:
        from .gpu import CudaDevice
    except ImportError as e:
        raise GenerationInputError(f"provider cuda: mamba_runtime's CUDA device support is missing ({e})") from None
    return CudaDevice()
