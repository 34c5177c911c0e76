"""Calibrated Gaussian sampling kernels (installed as ``glag.kernels``).

``reference`` (numpy/torch, the test oracle), ``cpu`` (Numba), ``calibrated_sampler.cu``
(CUDA C, loaded through CuPy). Pick one through :mod:`glag.sampling`, not directly.
"""
