"""Built-in hooks, one per module. Importing this package registers every one of them by name."""

from __future__ import annotations

import importlib
import pkgutil

# Each module registers its hook with @register; importing them all makes every name available.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

from .clipper import GradientClipper, NonFiniteGradientError  # noqa: E402
from .dead_relu import ActivationProbe, DeadReLUCounter  # noqa: E402
from .grad_norm import GradNormMonitor  # noqa: E402
from .input_stats import InputStats  # noqa: E402
from .lr_reducer import LRAutoReducer  # noqa: E402
from .nonfinite import NonFinite  # noqa: E402
from .plateau import PlateauDetector  # noqa: E402
from .skipped_steps import SkippedSteps  # noqa: E402
from .stale_params import StaleParams  # noqa: E402
from .target_stats import TargetStats  # noqa: E402
from .zero_grad import ZeroGradCheck  # noqa: E402

__all__ = [
    "ActivationProbe",
    "DeadReLUCounter",
    "GradNormMonitor",
    "GradientClipper",
    "InputStats",
    "LRAutoReducer",
    "NonFinite",
    "NonFiniteGradientError",
    "PlateauDetector",
    "SkippedSteps",
    "StaleParams",
    "TargetStats",
    "ZeroGradCheck",
]
