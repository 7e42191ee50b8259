"""Adam and AdamW as Keras 3 optimizers that update the weights exactly as PyTorch's do.

Scripts whose reference implementation trains in PyTorch use them, so that hyper-parameters copied
from the paper's code mean the same update here. Keras's Adam and PyTorch's differ in three ways:

- Where epsilon enters. Keras folds both bias corrections into the step size and adds epsilon to the
  raw root, `var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`; PyTorch adds it to the
  bias-corrected root, `var -= lr * m_hat / (sqrt(v_hat) + eps)` with `m_hat = m / (1 - b1^t)` and
  `v_hat = v / (1 - b2^t)`. Keras's step is PyTorch's with epsilon divided by `sqrt(1 - b2^t)` (by
  0.03 at the first step when b2 = 0.999), so the two part most early in training and wherever the
  gradients are not large next to epsilon (a GAN's epsilon, a small loss).
- The default epsilon: 1e-7 in Keras, 1e-8 in PyTorch. The classes here default to PyTorch's value;
  it is a hyper-parameter the caller passes, not part of the convention.
- Weight decay. PyTorch's Adam adds `weight_decay * var` to the gradient (L2), so the decay passes
  through the moment estimates; Keras's `Adam(weight_decay=...)` decays the weights decoupled, as
  AdamW. Both AdamWs multiply the weights by `1 - lr * weight_decay` before the Adam step; the
  default weight decay is 1e-2 in PyTorch and 4e-3 in Keras.

`TorchAdam` and `TorchAdamW` are ordinary Keras optimizers (`fit`, a `tf.function` train step,
learning-rate schedules, `LossScaleOptimizer`, tf.distribute strategies, `.keras` files), with Keras
Adam's variable names. `make_optimizer` builds either convention from one set of hyper-parameters and
`common.cli.add_optimizer_convention_argument` gives a script the flag that chooses (it lives there so
that a parser builds without loading Keras). tests/test_optimizers.py
checks the weights against `torch.optim` step for step.
"""

from types import SimpleNamespace

import keras
from keras import ops

from common import cli

OPTIMIZER_NAMES = ("adam", "adamw")
CONVENTIONS = cli.OPTIMIZER_CONVENTIONS
# PyTorch's defaults, used by both conventions of `make_optimizer`.
TORCH_EPSILON = 1e-8
TORCH_ADAMW_WEIGHT_DECAY = 1e-2


@keras.saving.register_keras_serializable(package="rsrepro")
class TorchAdam(keras.optimizers.Optimizer):
    """Adam as `torch.optim.Adam`: epsilon added after the bias correction, weight decay as L2.

    Step t = 1, 2, ... with gradient g, as PyTorch computes it:

        g = g + weight_decay * var               (L2; decoupled_weight_decay=False)
        var = var * (1 - lr * weight_decay)      (decoupled_weight_decay=True, i.e. AdamW)
        m = m + (1 - beta_1) * (g - m)
        v = beta_2 * v + (1 - beta_2) * g^2
        v_max = max(v_max, v)                    (amsgrad: v_max replaces v below)
        var = var - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + epsilon)

    Keras's `exclude_from_weight_decay` leaves variables out of either form of the decay, as a
    PyTorch parameter group with `weight_decay=0` does.

    Args:
        learning_rate: A float, a `keras.optimizers.schedules.LearningRateSchedule` or a callable
            without arguments (PyTorch's `lr`).
        beta_1: Decay rate of the first-moment estimate (`betas[0]`).
        beta_2: Decay rate of the second-moment estimate (`betas[1]`).
        epsilon: Added to the bias-corrected root of the second moment (`eps`; PyTorch's 1e-8).
        weight_decay: L2 coefficient, or the decoupled decay rate with `decoupled_weight_decay`.
        amsgrad: Use the running maximum of the second moment (AMSGrad), as PyTorch does.
        decoupled_weight_decay: Decay the weights as AdamW instead of adding L2 to the gradient.
        **kwargs: Keras's base optimizer arguments (`clipnorm`, `global_clipnorm`, `use_ema`,
            `gradient_accumulation_steps`, `name`, ...).
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = TORCH_EPSILON,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
        **kwargs,
    ):
        weight_decay = 0.0 if weight_decay is None else weight_decay
        # The checks of torch.optim.Adam, so that a value PyTorch refuses is refused here too.
        if isinstance(learning_rate, float) and learning_rate < 0.0:
            raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
        if epsilon < 0.0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if not (0.0 <= beta_1 < 1.0 and 0.0 <= beta_2 < 1.0):
            raise ValueError(f"beta_1 and beta_2 must be in [0, 1), got {beta_1} and {beta_2}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.decoupled_weight_decay = decoupled_weight_decay

    def build(self, var_list):
        """Create the moment estimates (and the running maximum for AMSGrad) of each variable."""
        if self.built:
            return
        super().build(var_list)
        # Keras Adam's names, so both conventions keep their state in the same layout.
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def _apply_weight_decay(self, variables):
        # Keras's base class would decay every optimizer's weights here, decoupled, with its constants
        # cast through float32. `update_step` applies PyTorch's form of the decay instead (L2 for Adam,
        # decoupled for AdamW), in the variable's own precision.
        return

    def apply(self, grads, trainable_variables=None):
        """Keras's `apply`, with the scalars that every variable's step shares built once per call."""
        # One step's bias corrections, step size and decay factor are the same for every variable of
        # a dtype: computed once per call (per trace in a compiled step) instead of once per variable,
        # which shortens the first step of a large model. Each call starts afresh, as the step count
        # (and a schedule's learning rate) moves between calls.
        # A plain object, not a dict: Keras would track a dict assigned to the optimizer.
        self._shared = SimpleNamespace(by_dtype={})
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._shared = None

    def _step_scalars(self, learning_rate, dtype):
        """This step's scalars in `dtype`, from the current iteration t and learning rate: the decay
        factor (AdamW) or L2 coefficient (Adam), the step size lr / (1 - beta_1^t), the inverse root
        1 / sqrt(1 - beta_2^t), 1 - beta_1, beta_2, 1 - beta_2 and epsilon."""
        shared = getattr(self, "_shared", None)
        if shared is not None and dtype in shared.by_dtype:
            return shared.by_dtype[dtype]

        def constant(value):
            # Built in the variable's dtype: a cast would round a float64 model's constants to float32.
            return ops.convert_to_tensor(value, dtype=dtype)

        learning_rate = ops.cast(learning_rate, dtype)
        decay = None
        if self.weight_decay:
            weight_decay = constant(self.weight_decay)
            # AdamW: the weights shrink by the step's learning rate times the decay; Adam: L2.
            decay = 1 - learning_rate * weight_decay if self.decoupled_weight_decay else weight_decay
        step = ops.cast(self.iterations + 1, dtype)
        beta_1 = constant(self.beta_1)
        beta_2 = constant(self.beta_2)
        scalars = SimpleNamespace(
            decay=decay,
            # PyTorch's order: the first moment's correction is folded into the step size, epsilon
            # is added to the bias-corrected root of v (below).
            step_size=ops.divide(learning_rate, 1 - ops.power(beta_1, step)),
            inverse_root=ops.rsqrt(1 - ops.power(beta_2, step)),
            one_minus_beta_1=1 - beta_1,
            beta_2=beta_2,
            one_minus_beta_2=1 - beta_2,
            epsilon=constant(self.epsilon),
        )
        if shared is not None:
            shared.by_dtype[dtype] = scalars
        return scalars

    def update_step(self, gradient, variable, learning_rate):
        """One PyTorch Adam step of `variable` (see the class docstring for the formula)."""
        shared = self._step_scalars(learning_rate, variable.dtype)
        decay = shared.decay
        gradient = ops.cast(gradient, variable.dtype)
        if decay is not None and self._use_weight_decay(variable):
            if self.decoupled_weight_decay:
                # AdamW: the weights shrink before the Adam step.
                self.assign(variable, ops.multiply(variable, decay))
            else:
                # Adam: L2, added to the gradient, so the decay goes through the moment estimates.
                gradient = ops.add(gradient, ops.multiply(decay, variable))

        index = self._get_variable_index(variable)
        momentum = self._momentums[index]
        velocity = self._velocities[index]
        self.assign_add(momentum, ops.multiply(ops.subtract(gradient, momentum), shared.one_minus_beta_1))
        self.assign(
            velocity,
            ops.add(
                ops.multiply(velocity, shared.beta_2),
                ops.multiply(ops.square(gradient), shared.one_minus_beta_2),
            ),
        )
        if self.amsgrad:
            velocity_max = self._velocity_hats[index]
            self.assign(velocity_max, ops.maximum(velocity_max, velocity))
            velocity = velocity_max
        # sqrt(v) / sqrt(1 - beta_2^t), taken as sqrt(v) * rsqrt(1 - beta_2^t): TensorFlow's graph
        # optimizer rewrites a quotient by a root of its own into this product, so the compiled step
        # rounds as a step that takes the root per variable, and the eager step as the compiled one.
        denominator = ops.add(ops.multiply(ops.sqrt(velocity), shared.inverse_root), shared.epsilon)
        self.assign_sub(variable, ops.divide(ops.multiply(momentum, shared.step_size), denominator))

    def get_config(self):
        """The constructor's arguments, for `.keras` files and `from_config`."""
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "decoupled_weight_decay": self.decoupled_weight_decay,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="rsrepro")
class TorchAdamW(TorchAdam):
    """AdamW as `torch.optim.AdamW`: `TorchAdam` with decoupled weight decay, 1e-2 by default.

    Each step first multiplies the weights by `1 - lr * weight_decay`, then takes `TorchAdam`'s step
    without L2 (as PyTorch, where AdamW is Adam with `decoupled_weight_decay=True`).

    Args:
        weight_decay: Decoupled decay rate, scaled by the step's learning rate (PyTorch's 1e-2).
        learning_rate, beta_1, beta_2, epsilon, amsgrad, **kwargs: As for `TorchAdam`.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = TORCH_EPSILON,
        weight_decay: float = TORCH_ADAMW_WEIGHT_DECAY,
        amsgrad: bool = False,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled_weight_decay=True,
            **kwargs,
        )

    def get_config(self):
        """The constructor's arguments (the decay is always decoupled, so that flag is not one)."""
        config = super().get_config()
        del config["decoupled_weight_decay"]
        return config


def make_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    *,
    convention: str = "torch",
    **kwargs,
) -> keras.optimizers.Optimizer:
    """Adam or AdamW in PyTorch's convention (`TorchAdam`, `TorchAdamW`) or in Keras's own.

    Hyper-parameters that are not passed take PyTorch's defaults under both conventions (epsilon
    1e-8, weight decay 0 for Adam and 1e-2 for AdamW, betas 0.9 and 0.999), so that the two conventions
    differ only in their update rule and `convention="keras"` is a like-for-like comparison.

    Args:
        name: `"adam"` or `"adamw"` (any case).
        learning_rate: A float or a `keras.optimizers.schedules.LearningRateSchedule`.
        convention: `"torch"` (epsilon after the bias correction, L2 weight decay in Adam) or
            `"keras"` (`keras.optimizers.Adam` / `AdamW`: epsilon before the bias correction).
        **kwargs: Keras's argument names: `beta_1`, `beta_2`, `epsilon`, `weight_decay`, `amsgrad`,
            and the base optimizer's (`clipnorm`, `global_clipnorm`, `name`, ...).

    Returns:
        A Keras optimizer, not yet built.

    Raises:
        ValueError: An unknown name or convention, or a weight decay for Adam in Keras's convention
            (Keras's Adam has no L2 form: its `weight_decay` is AdamW's decoupled decay).
    """
    key = name.lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZER_NAMES)}")
    if convention not in CONVENTIONS:
        raise ValueError(
            f"unknown optimizer convention {convention!r}: expected one of {', '.join(CONVENTIONS)}"
        )
    kwargs.setdefault("epsilon", TORCH_EPSILON)
    if convention == "torch":
        return (TorchAdam if key == "adam" else TorchAdamW)(learning_rate, **kwargs)
    if key == "adamw":
        kwargs.setdefault("weight_decay", TORCH_ADAMW_WEIGHT_DECAY)
        return keras.optimizers.AdamW(learning_rate, **kwargs)
    if kwargs.pop("weight_decay", None):
        raise ValueError(
            "Adam with weight decay has no Keras form (keras.optimizers.Adam decays decoupled, as AdamW): "
            "use convention='torch' or name='adamw'"
        )
    return keras.optimizers.Adam(learning_rate, **kwargs)
