"""Fused Triton kernels for knowledge distillation, each beside its torch reference."""
