"""Compute kernels of offload's own, built on first use (nothing is compiled at install).

What it is: ``cpu4``, the CPU 4-bit matmul on bitsandbytes' portable record bytes, with its
build cache and run-time choice of path (``cpu4.status()`` says which runs and why).

What it is not: the choice of kernel per format and device (``offload.quant`` makes it).
"""
