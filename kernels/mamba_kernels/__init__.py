"""mamba_kernels: Triton kernels for Mamba (selective scan forward/backward, causal conv, decode step)."""
