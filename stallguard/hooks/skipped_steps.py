"""SkippedSteps: count optimizer steps that a GradScaler skipped because of inf/NaN gradients."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..hook import Hook
from ..registry import register
from ..stats import CheckContext, Observation, StepContext

__all__ = ["SkippedSteps"]


@register("skipped_steps")
class SkippedSteps(Hook):
    """Report steps that ``torch.amp.GradScaler`` skipped.

    On an fp16 overflow GradScaler does not call ``optimizer.step()``, so the step hooks never fire
    for that step. The scaler then multiplies its scale by ``backoff_factor``; this hook watches the
    scale on the device (no host read) and counts the back-offs. They are reported as
    ``steps_skipped``, never as exploding gradients: an occasional skip is how dynamic loss scaling
    works. The Guard adds this hook itself when given ``scaler=``.

    Args:
        scaler: The ``torch.amp.GradScaler`` of the loop.
        **kwargs: ``every``, ``start_step``, ``name`` (see :class:`~stallguard.Hook`).

    Example:
        >>> import torch, stallguard as sg
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> guard = sg.Guard(model, opt, hooks=[], scaler=scaler, sinks=[])
        >>> type(guard.hooks[0]).__name__
        'SkippedSteps'
        >>> guard.close()
    """

    def __init__(self, scaler: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not callable(getattr(scaler, "get_backoff_factor", None)):
            raise TypeError(f"SkippedSteps: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.add_state("skipped", torch.zeros((), dtype=torch.float64), reduce="max", reset=True)
        self.add_state("scale", torch.zeros((), dtype=torch.float64), reduce="max")
        self.add_state("total", 0)
        self._last: torch.Tensor | None = None

    def _look(self) -> None:
        current = getattr(self.scaler, "_scale", None)  # created lazily by the scaler's first scale()
        if current is None or not self.scaler.is_enabled():
            return
        current = current.detach().to(self.skipped.device, torch.float64).reshape(())
        if self._last is None:
            self._last = current.clone()
        else:
            # Several skips between two looks show as several back-offs: count them by the ratio.
            per_skip = math.log(1.0 / self.scaler.get_backoff_factor())
            n = torch.round(torch.log(self._last / current) / per_skip).clamp_min(0)
            self.skipped += torch.nan_to_num(n, nan=0.0, posinf=0.0)
            self._last.copy_(current)
        self.scale.copy_(current)

    def on_observe(self, obs: Observation) -> None:
        self._look()

    def on_before_step(self, ctx: StepContext) -> None:
        self._look()

    def on_check(self, check: CheckContext) -> None:
        n = int(check.values["skipped"])
        if n <= 0:
            return
        self.total += n
        self.emit(
            "steps_skipped",
            "info" if n <= 2 else "warning",
            f"GradScaler skipped {n} optimizer step(s) since the last check (inf/NaN gradients in fp16); "
            f"loss scale now {check.values['scale']:.4g}",
            skipped=n,
            total_skipped=self.total,
            scale=check.values["scale"],
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("scaler", None)
        return config
