"""Backbones split into a feature extractor and a linear head.

``create_model(arch, num_classes, in_channels)`` returns a :class:`Classifier` whose
``features(x)`` gives the pooled, post-ReLU feature f(x) (B, d) and ``head`` the linear classifier.
"""
from .classifier import ARCHS, Classifier, create_model

__all__ = ["ARCHS", "Classifier", "create_model"]
