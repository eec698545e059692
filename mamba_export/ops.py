"""Reference implementations of Mamba's sequence operators, in plain PyTorch.

These are the ground truth that every kernel (Triton, C++, CUDA) and every exported graph is tested against. They
favour clarity over speed, and compute in float32 (float64 when given float64 inputs) whatever the input dtype, as the
released CUDA kernels do.

Glossary (Gu & Dao 2023, Algorithm 2):
    b   batch size                       l   sequence length
    d   channels of the scan (d_inner)   n   SSM state size (d_state)
    k   causal conv width (d_conv)
    u   scan input x(t), (b, d, l)       Δ   delta, time step per channel and token, (b, d, l)
    A   state matrix (diagonal), (d, n)  B, C   input-dependent projections, (b, n, l)
    D   skip connection, (d,)            z   gate, (b, d, l)
    h   SSM state, (b, d, n)

Layout: channels before time, as state-spaces/mamba's kernels take them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _first_calls_on_one_thread() -> None:
    """Call torch's MKL-backed elementwise functions once, on tiny tensors (one thread), at import.

    On torch 2.13's CPU build the first float32 ``torch.exp`` of a process that two threads share (8192 elements: two
    chunks) returned the second thread's chunk with errors up to 3.5e-4 (relative) in about one process in 15 (4 of
    62 fresh processes, 2 of 60 in a second run); with one single-threaded exp first, 0 of 124, and after importing
    this module 0 of 60 (twenty-fifth session, a 2-core machine). It looks like a one-time initialisation racing
    between the threads. It hit the export's constants (layer 0's A; computed without torch since then) and would hit
    whatever a process computes first with these functions."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((4,), 0.5, dtype=dtype)
        for fn in (torch.exp, torch.expm1, torch.log, torch.log1p, torch.tanh, torch.sqrt, torch.rsqrt, torch.sin,
                   torch.cos, torch.sigmoid, F.softplus, F.silu):
            fn(x)


_first_calls_on_one_thread()

__all__ = [
    "compute_dtype",
    "selective_scan_ref",
    "causal_conv1d_ref",
    "causal_conv1d_step_ref",
    "selective_state_update_ref",
    "selective_scan_fast",
    "rms_norm_ref",
    "add_rms_norm_ref",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of the scan for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan_prologue(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of a selective scan in the compute dtype, Δ with its bias and softplus applied, and h_0 (b, d, n).

    Fully annotated and TorchScript-compatible: the TorchScript exporter compiles the reference scan and this with it.
    """
    cd = compute_dtype(u.dtype)
    u, delta, A, B, C = u.to(cd), delta.to(cd), A.to(cd), B.to(cd), C.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d = u.shape[0], u.shape[1]
    h0 = torch.zeros(b, d, A.shape[1], dtype=cd, device=u.device) if initial_state is None else initial_state.to(cd)
    return u, delta, A, B, C, h0


def _scan_epilogue(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D u, gated by silu(z), in y's (compute) dtype; u is already in that dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t;  y_t = C_t h_t + D u_t;  y_t *= silu(z_t).

    Args:
        u: (b, d, l) input.
        delta: (b, d, l) time steps before bias and softplus.
        A: (d, n) state matrix (already negative: A = -exp(A_log)).
        B, C: (b, n, l) input and output projections.
        D: (d,) skip weights, or None.
        z: (b, d, l) gate, or None.
        delta_bias: (d,) added to delta before the softplus, or None.
        delta_softplus: apply softplus to delta (after the bias).
        initial_state: (b, d, n) state h_0 to continue from; zeros when None.

    Returns:
        y: (b, d, l) in u's dtype, and the final state h_l: (b, d, n) in the compute dtype.
    """
    dtype_in = u.dtype
    u, delta, A, B, C, h = _scan_prologue(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    b, d, l = u.shape
    dA = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :])  # (b, d, l, n)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, l, n)
    ys = []
    for t in range(l):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
    y = _scan_epilogue(y, u, D, z)
    return y.to(dtype_in), h


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, as state-spaces/mamba computes it: x / sqrt(mean(x^2) + eps) * weight in the compute
    dtype of the weight (float32; float64 for float64 weights), returned in the weight's dtype."""
    xf = x.to(compute_dtype(weight.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).to(weight.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add and the next RMSNorm: residual_out = residual + x in the residual's dtype (x
    alone, cast to ``residual_dtype``, where residual is None: the start of the stream); y = rms_norm_ref(residual_out).

    Args:
        x: (..., D) a block's output, or the embeddings; residual: (..., D) or None; weight: (D,).

    Returns:
        y (..., D) in the weight's dtype, residual_out (..., D).
    """
    residual_out = x.to(residual_dtype) if residual is None else residual + x.to(residual.dtype)
    return rms_norm_ref(residual_out, weight, eps), residual_out


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time, continuing from ``conv_state``.

    Args:
        x: (b, d, l) input.
        weight: (d, k) one filter per channel; out_t = sum_j weight[:, j] * x_{t - k + 1 + j}.
        bias: (d,) or None.
        conv_state: (b, d, k - 1) the last k - 1 inputs before x (zeros, the start of a sequence, when None).
        silu: apply SiLU to the output.

    Returns:
        y: (b, d, l) in x's dtype, and the new conv state (b, d, k - 1) in the compute dtype: the last k - 1 inputs.
    """
    cd = compute_dtype(x.dtype)
    b, d, l = x.shape
    k = weight.shape[1]
    if conv_state is None:
        conv_state = torch.zeros(b, d, k - 1, dtype=cd, device=x.device)
    xs = torch.cat([conv_state.to(cd), x.to(cd)], dim=-1)  # (b, d, k - 1 + l)
    y = F.conv1d(xs, weight.to(cd).unsqueeze(1), None if bias is None else bias.to(cd), groups=d)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), xs[:, :, xs.shape[-1] - (k - 1):]


def causal_conv1d_step_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`causal_conv1d_ref` in recurrent form: shift the state left, append x, dot with the filter.

    Args:
        x: (b, d) the new input; weight: (d, k); bias: (d,) or None; conv_state: (b, d, k - 1).

    Returns:
        y: (b, d) in x's dtype, and the new conv state (b, d, k - 1) in the compute dtype.
    """
    cd = compute_dtype(x.dtype)
    window = torch.cat([conv_state.to(cd), x.to(cd).unsqueeze(-1)], dim=-1)  # (b, d, k)
    y = (window * weight.to(cd)).sum(-1)
    if bias is not None:
        y = y + bias.to(cd)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), window[:, :, 1:]


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the selective scan in recurrent form.

    Args:
        state: (b, d, n) h_{t-1}; x, dt, z: (b, d); A: (d, n); B, C: (b, n); D, dt_bias: (d,).

    Returns:
        y: (b, d) in x's dtype, and the new state h_t (b, d, n) in the compute dtype.
    """
    cd = compute_dtype(x.dtype)
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.to(cd)
    h = torch.exp(dt.unsqueeze(-1) * A.to(cd)) * state.to(cd) + (dt * xf).unsqueeze(-1) * B.to(cd).unsqueeze(1)
    y = (h * C.to(cd).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + xf * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype), h


class _LinearRecurrence(torch.autograd.Function):
    """hs[t] = dA[t] * hs[t - 1] + dBu[t] with hs[-1] = h0, time-major, with a hand-written backward.

    Autograd through the reference's per-step loop writes a full-size gradient for every time step (quadratic in l);
    this backward is the reverse recurrence, linear in l:
        G[t] = grad_hs[t] + dA[t + 1] * G[t + 1];  grad_dBu = G;  grad_dA[t] = G[t] * hs[t - 1];  grad_h0 = dA[0] * G[0].
    """

    @staticmethod
    def forward(ctx, dA: torch.Tensor, dBu: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """dA, dBu: (l, b, d, n); h0: (b, d, n) -> hs (l, b, d, n)."""
        hs = torch.empty_like(dBu)
        h = h0
        for t in range(dA.shape[0]):
            h = torch.addcmul(dBu[t], dA[t], h, out=hs[t])
        ctx.save_for_backward(dA, hs, h0)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: torch.Tensor):
        dA, hs, h0 = ctx.saved_tensors
        G = grad_hs.clone(memory_format=torch.contiguous_format)
        for t in range(G.shape[0] - 2, -1, -1):
            G[t].addcmul_(dA[t + 1], G[t + 1])
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0)
        return G * h_prev, G, dA[0] * G[0]


def selective_scan_fast(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_ref` (same arguments, shapes and results) for training on CPU: time-major tensors and
    a recurrence with a hand-written backward (:class:`_LinearRecurrence`), so the backward pass is linear in l."""
    dtype_in = u.dtype
    u, delta, A, B, C, h0 = _scan_prologue(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    b, d, l = u.shape
    if l == 0:
        return u.new_zeros(b, d, 0), h0
    delta_t, u_t = delta.permute(2, 0, 1), u.permute(2, 0, 1)  # (l, b, d)
    dA = torch.exp(delta_t.unsqueeze(-1) * A)  # (l, b, d, n)
    dBu = (delta_t * u_t).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)  # (l, b, d, n)
    hs = _LinearRecurrence.apply(dA, dBu, h0)
    y = torch.einsum("lbdn,lbn->bdl", hs, C.permute(2, 0, 1))
    y = _scan_epilogue(y, u, D, z)
    return y.to(dtype_in), hs[-1]
