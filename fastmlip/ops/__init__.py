"""Torch custom ops (``torch.library``) with autograd, one file per op family, dispatched per backend."""
