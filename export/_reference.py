"""Compatibility name: the PyTorch reference of the int8-activation arithmetic now lives in the core
(``paretoq_ao.ops.reference_linear_8da``)."""

from paretoq_ao.ops import reference_linear_8da as reference_linear_int8

__all__ = ["reference_linear_int8"]
