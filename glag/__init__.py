"""glag: GLAG (Gradual Balanced Loss + Adaptive Feature Generator) for long-tailed classification.

Pipeline (see README.md): stage one (:mod:`glag.stage1`, GraLoss from :mod:`glag.losses`),
feature extraction to HDF5 (:mod:`glag.features`), AFG + classifier-only stage two
(:mod:`glag.afg`, :mod:`glag.sampling`, :mod:`glag.stage2`). Equations: ``shared/METHOD.md``.

Heavy optional dependencies (CuPy, faiss-gpu) are imported lazily, where used.
"""
__version__ = "0.1.0"
