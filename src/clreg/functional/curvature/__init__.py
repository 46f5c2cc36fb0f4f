"""Curvature from per-layer statistics: the engine (:mod:`~clreg.functional.curvature.engine`) and the
rules of the layer types it covers (:mod:`~clreg.functional.curvature.layers`)."""

from .engine import CurvatureEngine, CurvatureSums
from .layers import Call, LayerRule, rule_for

__all__ = ["Call", "CurvatureEngine", "CurvatureSums", "LayerRule", "rule_for"]
