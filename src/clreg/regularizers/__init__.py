"""Stateful regularizers: thin modules over :mod:`clreg.functional`."""

from .agem import AGEM
from .base import Regularizer
from .compose import Compose
from .der import DER
from .er_ace import ERACE
from .ewc import EWC
from .feature_distillation import FeatureDistillation
from .kfac_ewc import KFACEWC
from .l2sp import L2SP
from .ledger import GradientLedger
from .lwf import LwF
from .mas import MAS
from .online_ewc import OnlineEWC
from .quadratic import QuadraticPenalty
from .rwalk import RWalk
from .si import SI

__all__ = [
    "AGEM",
    "DER",
    "ERACE",
    "EWC",
    "KFACEWC",
    "L2SP",
    "MAS",
    "SI",
    "Compose",
    "FeatureDistillation",
    "GradientLedger",
    "LwF",
    "OnlineEWC",
    "QuadraticPenalty",
    "RWalk",
    "Regularizer",
]
