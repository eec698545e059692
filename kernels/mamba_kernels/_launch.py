"""Host-side helpers for the launchers: integer arithmetic without Triton's constexpr machinery, the SM count, and a
cheaper launch of an already compiled kernel.

Why: in an eager training step the host, not the GPU, sets the pace of these ops (H100 host, torch 2.11, triton 3.6:
a `JITFunction` launch took 40-80 us, `triton.cdiv` called from Python ~4 us, `torch.cuda.get_device_properties` ~20
us; the b8 d1536 l2048 scan's forward + backward spent ~1.7 ms of host time for ~1.2 ms of GPU time).
"""

from __future__ import annotations

import os

import torch
import triton

# Triton releases whose launch protocol `FastKernel` repeats: `JITFunction.run` ends, for a compiled kernel, with
# kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
#            enter_hook, exit_hook, *bound_args.values())
# where bound_args holds every parameter in signature order (constexprs included). 3.6 runs on the GPU machine (where
# the fast path is tested); 3.9's source has the same lines. Others take Triton's own path.
_PROTOCOL_VERSIONS = ((3, 6), (3, 9))
_CACHE_LIMIT = 4096


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b (``triton.cdiv`` is a constexpr function: ~4 us a host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_SMS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached), 2 for the interpreter on the CPU."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SMS.get(index)
    if sms is None:
        sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook does anything: None or an empty chain (triton 3.6's ``HookChain``) does not."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    runtime = triton.knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _fast_enabled() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    forced = os.environ.get("MAMBA_KERNELS_FAST_LAUNCH")
    if forced is not None:
        return forced not in ("0", "")
    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return version in _PROTOCOL_VERSIONS


class FastKernel:
    """A ``@triton.jit`` kernel whose ``kernel[grid](*args, **kwargs)`` skips Triton's per-launch work (argument
    binding and specialisation, the cache key, option parsing) once the same call has been launched before.

    The first launch with a given key goes through Triton (``JITFunction.run``, which compiles where needed and
    returns the compiled kernel); later ones call that compiled kernel's launcher directly, as ``JITFunction.run``
    does. The key is at least as fine as Triton's specialisation, so it never picks another compilation than Triton
    would: each tensor argument's dtype and address modulo 16, every other argument's type and value, the keyword
    arguments (constexprs and options) and the current device. Triton's own path runs instead under the interpreter,
    for Triton releases outside ``_PROTOCOL_VERSIONS``, with ``MAMBA_KERNELS_FAST_LAUNCH=0``, and while a launch hook
    or pre-run hook is set."""

    def __init__(self, fn):
        self.fn = fn
        self._cache: dict = {}
        self._fast = _fast_enabled()

    def __getattr__(self, name):  # everything else (warmup, cache, src, ...) is the Triton kernel's
        return getattr(self.fn, name)

    def __getitem__(self, grid: tuple):
        if not self._fast:
            return self.fn[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: tuple, args: tuple, kwargs: dict):
        fn = self.fn
        if fn.pre_run_hooks or _hooks_set():
            return fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = (device, tuple(kwargs.items()), tuple(map(type, args)),
               tuple([(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args]))
        hit = self._cache.get(key)
        if hit is None:
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            names = fn.arg_names[len(args):]  # the parameters after the positional ones, in signature order
            params = {p.name: p for p in fn.params}
            tail = tuple(kwargs[n] if n in kwargs else params[n].default for n in names)
            self._cache[key] = (kernel, tail)
            return kernel
        kernel, tail = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)
        return kernel


def fast_launch(fn) -> FastKernel:
    """Decorator, above ``@triton.jit``: see :class:`FastKernel`."""
    return FastKernel(fn)


def traced() -> bool:
    """Whether the registered ``torch.library`` ops must run rather than their launchers: under torch.compile or
    torch.export (which see one op, not a graph break) and under torch.func transforms. Eager calls skip the ops'
    Python dispatch layers (host time of a b1 d64 l64 scan forward: 0.456 ms as the op, 0.205 as its launcher)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (grad mode on and one of them requiring a gradient)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def pick(op, eager, launcher, grad: bool):
    """What a sequence op's public function calls: the registered ``op`` when :func:`traced`, else the ``eager``
    autograd Function where a gradient is wanted (``grad``), else the ``launcher`` itself (no autograd to pay for)."""
    if traced():
        return op
    return eager if grad else launcher


def eager_function(forward, setup_context, backward, non_differentiable: tuple[int, ...] = ()):
    """``apply`` of an autograd Function for eager mode that runs ``forward(*inputs)``, then ``setup_context(ctx,
    inputs, output)`` (the function registered with the op's autograd), and ``backward(ctx, *grads)``. Written in the
    old style (forward takes ctx) because ``Function.apply`` binds a setup_context-style forward's arguments with
    ``inspect.signature`` on every call (~30 us of host time). non_differentiable: indices of outputs without a
    gradient."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            if non_differentiable:
                ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"Eager_{forward.__name__}"
    return Eager.apply
