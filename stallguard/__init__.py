"""stallguard: find out why your loss is not decreasing, while the run is still going.

Attach a :class:`Guard` to any PyTorch training loop; its hooks watch the run on the device, name the
likely cause of a stall with evidence and advice, and, when asked, repair what an optimizer setting
can repair.
"""

from __future__ import annotations

from . import hooks as _builtin_hooks  # noqa: F401  (registers the built-in hooks by name)
from .causes import CAUSES
from .diagnosis import Diagnosis, diagnose
from .distributed import LayoutMismatchError, SyncTimeoutError
from .events import SCHEMA_VERSION, Event, EventBus, Severity
from .guard import Guard, Series
from .hook import REDUCTIONS, Hook, TrainingInterrupted
from .hooks import (
    ActivationProbe,
    CapacityCheck,
    DeadReLUCounter,
    GradientClipper,
    GradNormMonitor,
    InitCheck,
    InputStats,
    LRAutoReducer,
    NonFinite,
    NonFiniteGradientError,
    Overfit,
    PlateauDetector,
    Regularization,
    SaturationCheck,
    SkippedSteps,
    StaleParams,
    TargetStats,
    UpdateRatio,
    ZeroGradCheck,
)
from .registry import available, create, default_hooks, register
from .sinks import CallableSink, JSONLSink, LoggingSink, MemorySink, Sink, TensorBoardSink, read_jsonl
from .stats import CheckContext, GradNorms, Observation, StepContext, UpdateNorms

__version__ = "0.1.0"

__all__ = [
    "CAUSES",
    "REDUCTIONS",
    "SCHEMA_VERSION",
    "ActivationProbe",
    "CallableSink",
    "CapacityCheck",
    "CheckContext",
    "DeadReLUCounter",
    "Diagnosis",
    "Event",
    "EventBus",
    "GradNormMonitor",
    "GradNorms",
    "GradientClipper",
    "Guard",
    "Hook",
    "InitCheck",
    "InputStats",
    "JSONLSink",
    "LRAutoReducer",
    "LayoutMismatchError",
    "LoggingSink",
    "MemorySink",
    "NonFinite",
    "NonFiniteGradientError",
    "Observation",
    "Overfit",
    "PlateauDetector",
    "Regularization",
    "SaturationCheck",
    "Series",
    "Severity",
    "Sink",
    "SkippedSteps",
    "StaleParams",
    "StepContext",
    "SyncTimeoutError",
    "TargetStats",
    "TensorBoardSink",
    "TrainingInterrupted",
    "UpdateNorms",
    "UpdateRatio",
    "ZeroGradCheck",
    "__version__",
    "available",
    "create",
    "default_hooks",
    "diagnose",
    "read_jsonl",
    "register",
]
