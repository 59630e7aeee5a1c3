"""Fused ops for the decoder: one module per op, each a Triton kernel with its autograd Function
(:mod:`~bigtrain.kernels.rmsnorm`, :mod:`~bigtrain.kernels.rotary`, :mod:`~bigtrain.kernels.swiglu`,
:mod:`~bigtrain.kernels.linear_cross_entropy`), their plain-PyTorch references
(:mod:`~bigtrain.kernels.reference`), the per-call choice between them (:mod:`~bigtrain.kernels.dispatch`,
driven by ``model.kernels``) and attention (:mod:`~bigtrain.kernels.attention`).

Importing this package imports nothing: the Triton modules import triton and are loaded only
when a kernel actually runs.
"""
