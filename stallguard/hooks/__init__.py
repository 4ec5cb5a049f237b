"""Built-in hooks, one per module. Importing this package registers every one of them by name."""

from __future__ import annotations

import importlib
import pkgutil

# Each module registers its hook with @register; importing them all makes every name available.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

from .capacity import CapacityCheck  # noqa: E402
from .clipper import GradientClipper, NonFiniteGradientError  # noqa: E402
from .dead_relu import ActivationProbe, DeadReLUCounter  # noqa: E402
from .grad_norm import GradNormMonitor  # noqa: E402
from .init_check import InitCheck  # noqa: E402
from .input_stats import InputStats  # noqa: E402
from .lr_reducer import LRAutoReducer  # noqa: E402
from .nonfinite import NonFinite  # noqa: E402
from .overfit import Overfit  # noqa: E402
from .plateau import PlateauDetector  # noqa: E402
from .regularization import Regularization  # noqa: E402
from .saturation import SaturationCheck  # noqa: E402
from .skipped_steps import SkippedSteps  # noqa: E402
from .stale_params import StaleParams  # noqa: E402
from .target_stats import TargetStats  # noqa: E402
from .update_ratio import UpdateRatio  # noqa: E402
from .zero_grad import ZeroGradCheck  # noqa: E402

__all__ = [
    "ActivationProbe",
    "CapacityCheck",
    "DeadReLUCounter",
    "GradNormMonitor",
    "GradientClipper",
    "InitCheck",
    "InputStats",
    "LRAutoReducer",
    "NonFinite",
    "NonFiniteGradientError",
    "Overfit",
    "PlateauDetector",
    "Regularization",
    "SaturationCheck",
    "SkippedSteps",
    "StaleParams",
    "TargetStats",
    "UpdateRatio",
    "ZeroGradCheck",
]
