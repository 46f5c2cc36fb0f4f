"""clreg: continual-learning regularizers as composable, checkpointable loss modules.

Example:
    >>> import torch, clreg
    >>> model = torch.nn.Linear(4, 3)
    >>> reg = clreg.Compose(clreg.EWC(model, lam=3.0), clreg.LwF(model, temperature=2.0))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> out = model(x)
    >>> loss = torch.nn.functional.cross_entropy(out, y) + reg(model, inputs=x, outputs=out)
    >>> reg.consolidate(model, torch.utils.data.TensorDataset(x, y), clreg.TaskSpec())
"""

from . import distributed, functional
from ._version import __version__
from .data import KeywordInputs
from .logit_buffer import LogitBuffer
from .regularizers import (
    AGEM,
    DER,
    ERACE,
    EWC,
    KFACEWC,
    L2SP,
    MAS,
    SI,
    Compose,
    FeatureDistillation,
    GradientLedger,
    LwF,
    OnlineEWC,
    QuadraticPenalty,
    Regularizer,
    RWalk,
)
from .replay import ReplayBuffer
from .session import ContinualSession, eval_mode
from .spec import OutputSpec, TaskSpec, select_output

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
    "ContinualSession",
    "FeatureDistillation",
    "GradientLedger",
    "KeywordInputs",
    "LogitBuffer",
    "LwF",
    "OnlineEWC",
    "OutputSpec",
    "QuadraticPenalty",
    "RWalk",
    "Regularizer",
    "ReplayBuffer",
    "TaskSpec",
    "__version__",
    "distributed",
    "eval_mode",
    "functional",
    "select_output",
]
