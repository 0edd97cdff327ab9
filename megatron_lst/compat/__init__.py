"""Compatibility layers that let megatron.core run where it was not written to."""

from megatron_lst.compat.cpu import enable_cpu_compat, is_cpu_compat_enabled

__all__ = ["enable_cpu_compat", "is_cpu_compat_enabled"]
