"""Triton kernels for NSA: training (fwd + bwd), prefill and decode (SPEC section 2)."""
