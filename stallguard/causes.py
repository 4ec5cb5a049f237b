"""The cause vocabulary: why a loss does not decrease, one stable id per cause."""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["CAUSES", "check_cause"]

#: Every cause stallguard can name, id -> one-line description. The ids are stable.
CAUSES: MappingProxyType[str, str] = MappingProxyType(
    {
        "lr_too_high": "The learning rate is too high: updates overshoot, the loss jumps, spikes or diverges.",
        "lr_too_low": "The learning rate is too low: updates are tiny next to the weights and the loss barely moves.",
        "bad_init": "The weights start badly: all zero, constant, symmetric, or at a scale far from what fan-in asks.",
        "over_regularization": "Weight decay or an L2 penalty dominates the gradient and holds the weights near zero.",
        "unnormalized_inputs": "The inputs are not normalized: raw ranges (0-255), large means, or stds far from 1.",
        "dying_relu": "ReLU units output zero for every input, so they and the weights before them stop learning.",
        "saturated_activations": "Sigmoid/tanh units sit in their flat regions, so almost no gradient passes them.",
        "vanishing_gradients": "Gradients shrink layer by layer, so the first layers barely learn.",
        "exploding_gradients": "Gradients grow without bound (spikes, overflow), so updates are wild.",
        "class_imbalance": "One class dominates the labels, so predicting it alone looks good enough.",
        "missing_zero_grad": "Gradients are not cleared between steps (no optimizer.zero_grad()), so they pile up.",
        "params_not_updated": "Parameters are not updated: outside the optimizer, frozen, detached or stuck.",
        "no_signal": "The targets carry no learnable relation to the inputs: random, dummy or misaligned labels.",
        "insufficient_capacity": "The model is too small for the task: it learns what it can and then stalls.",
        "overfitting": "The training loss keeps falling while the validation loss rises.",
        "non_finite": "NaN or Inf appear in the arithmetic (log(0), division by zero, overflow).",
    }
)


def check_cause(cause: str) -> str:
    """Return ``cause`` if it is a known cause id; raise ``ValueError`` listing them otherwise."""
    if cause not in CAUSES:
        raise ValueError(f"unknown cause {cause!r}; known causes: {', '.join(CAUSES)}")
    return cause
