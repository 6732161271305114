"""Compute kernels of lora-da (installed as ``lora_da.kernels``).

Each kernel lives beside a plain-PyTorch reference of the same function; the
reference is the oracle the fast version is tested against and the path used
wherever the fast version does not apply.
"""
