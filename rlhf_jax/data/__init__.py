"""Data helpers: padding and bucketing (NumPy), tokenization, data sets, demo tasks.

The padding helpers are re-exported here; the other modules of this package
are imported by name (`rlhf_jax.demo.tasks`, ...).
"""
from rlhf_jax.data.padding import DEFAULT_BUCKETS, bucket_length, left_pad, pad_rows, right_pad

__all__ = ["DEFAULT_BUCKETS", "bucket_length", "left_pad", "pad_rows", "right_pad"]
