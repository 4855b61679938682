"""Triton kernels for ``paretoq::linear`` on CUDA (installed as ``paretoq_ao.triton_kernels``).

Not implemented yet: until they land, CUDA tensors run the op's PyTorch reference implementation.
"""
