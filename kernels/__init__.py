"""Compute kernels of lora-da (installed as ``lora_da.kernels``).

Each kernel lives beside a plain-PyTorch reference of the same function; the
reference is the oracle the fast version is tested against and the path used
wherever the fast version does not apply.

Modules:

* ``kfac_stats`` / ``kfac_stats_triton``: accumulation of the K-FAC statistics
  (input factor Z on upper-triangle tiles, output-factor diagonal y, gradient G).
* ``omega`` / ``omega_triton``: batched Initialization Guidance Matrices Ω.
* ``triton_launch``: launch policy of the Triton kernels (interpreter switch,
  autotune configurations, block sizes, ``tl.dot`` precision).
* ``dispatch``: ``select_backend(device, requested, dtype)`` for the statistics pass.

``kfac_stats_triton`` and ``omega_triton`` import ``triton``; ``triton_launch`` only
inside ``statistics_configs``; nothing else here does.
"""
