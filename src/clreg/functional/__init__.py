"""Pure math on lists and dicts of tensors: penalties, Fisher estimators, SI, distillation, MAS."""

from .agem import agem_coefficient, agem_dots, agem_project, agem_project_
from .distillation import regression_distillation, sigmoid_distillation, softmax_distillation
from .ewc import ewc_merge_
from .feature_distillation import (
    FEATURE_KINDS,
    cosine_feature_distillation,
    l2_feature_distillation,
    pod_spatial_distillation,
    pod_spatial_pooling,
)
from .fisher import (
    ENGINES,
    ESTIMATORS,
    EXACT_MAX_CLASSES,
    default_estimator,
    fisher_curvature,
    fisher_diagonal,
    resolve_estimator,
)
from .kfac import kfac_penalty, kfac_penalty_grad, kfac_penalty_value
from .l2sp import add_l2sp_penalty_grad_, l2sp_penalty, l2sp_penalty_grad, l2sp_penalty_value
from .logit_replay import asymmetric_cross_entropy, logit_mse, present_classes
from .mas import mas_importance
from .olora import layer_overlap_grad, orthogonality
from .penalty import (
    add_quadratic_penalty_grad_,
    importance_roots,
    quadratic_penalty,
    quadratic_penalty_grad,
    quadratic_penalty_value,
)
from .rwalk import fisher_ema_update_, rwalk_importance_, rwalk_score_update_
from .si import CLAMPS, si_importance_, si_path_update_

__all__ = [
    "CLAMPS",
    "ENGINES",
    "ESTIMATORS",
    "EXACT_MAX_CLASSES",
    "FEATURE_KINDS",
    "add_l2sp_penalty_grad_",
    "add_quadratic_penalty_grad_",
    "agem_coefficient",
    "agem_dots",
    "agem_project",
    "agem_project_",
    "asymmetric_cross_entropy",
    "cosine_feature_distillation",
    "default_estimator",
    "ewc_merge_",
    "fisher_curvature",
    "fisher_diagonal",
    "fisher_ema_update_",
    "importance_roots",
    "kfac_penalty",
    "kfac_penalty_grad",
    "kfac_penalty_value",
    "l2_feature_distillation",
    "l2sp_penalty",
    "l2sp_penalty_grad",
    "l2sp_penalty_value",
    "layer_overlap_grad",
    "logit_mse",
    "mas_importance",
    "orthogonality",
    "pod_spatial_distillation",
    "pod_spatial_pooling",
    "present_classes",
    "quadratic_penalty",
    "quadratic_penalty_grad",
    "quadratic_penalty_value",
    "regression_distillation",
    "resolve_estimator",
    "rwalk_importance_",
    "rwalk_score_update_",
    "si_importance_",
    "si_path_update_",
    "sigmoid_distillation",
    "softmax_distillation",
]
