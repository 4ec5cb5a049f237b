"""The quick subset: per cause the scenario that runs fastest, and three healthy runs."""

from __future__ import annotations

__all__ = ["QUICK", "QUICK_HEALTHY"]

#: cause -> the fastest scenario that shows it (times measured on one CPU thread).
QUICK: dict[str, str] = {
    "lr_too_high": "lr_high_mlp_sgd",
    "lr_too_low": "lr_low_mlp_sgd",
    "bad_init": "zero_init_mlp",
    "over_regularization": "weight_decay_mlp_sgd",
    "unnormalized_inputs": "raw_features_tanh_mlp",
    "dying_relu": "dead_bias_mlp",
    "saturated_activations": "sigmoid_offset_mlp",
    "vanishing_gradients": "deep_sigmoid_mlp",
    "exploding_gradients": "outlier_targets_mlp",
    "class_imbalance": "imbalanced_cnn",
    "missing_zero_grad": "no_zero_grad_mlp_sgd",
    "params_not_updated": "other_instance_mlp",
    "no_signal": "random_labels_mlp",
    "insufficient_capacity": "linear_stack_xor",
    "overfitting": "small_data_mlp",
    "non_finite": "nan_rows_mlp",
}

QUICK_HEALTHY: list[str] = ["healthy_small_batch_sgd", "healthy_onecycle_mlp", "healthy_converges_early"]
