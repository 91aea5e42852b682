"""Triton kernels (issue #6): one op per file, with its launcher and its torch reference beside it."""
