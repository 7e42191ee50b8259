"""TorchAdam and TorchAdamW take torch.optim.Adam's and AdamW's steps; Keras's own Adam does not.

A Dense(3)-ReLU-Dense(2) MLP and its torch twin start from the same weights and take the same steps
on one batch (betas 0.5 and 0.999 as in a GAN, epsilon 1e-3, weight decay 0.05); after every step
the weights must agree: within 1e-12 in float64, 1e-5 relative in float32. The same comparison of a
pair that differs on purpose (Keras's Adam, epsilon before the bias correction; decoupled decay in
place of L2 and back) must fail it by orders of magnitude, so a bug of that kind cannot pass.

Run as a script (`python tests/test_optimizers.py INPUT.npz OUTPUT.npz`), this file is the
two-replica MirroredStrategy worker of `test_fit_on_two_mirrored_replicas_equals_torch`.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from keras import layers, ops

from common import cli, optimizers
from common.optimizers import TorchAdam, TorchAdamW

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# Float32's rounding of the learning rate, which Keras keeps in a float32 variable; torch gets it too.
LEARNING_RATE = float(np.float32(0.01))
HYPER_PARAMETERS = {"beta_1": 0.5, "beta_2": 0.999, "epsilon": 1e-3}
WEIGHT_DECAY = 0.05
TOLERANCE_FLOAT64 = 1e-12
RELATIVE_TOLERANCE_FLOAT32 = 1e-5


def batch(dtype="float64"):
    """A fixed batch of 8 inputs `(8, 4)` and regression targets `(8, 2)`."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 4)).astype(dtype), rng.normal(size=(8, 2)).astype(dtype)


def keras_mlp(dtype="float64", seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), dtype=dtype)
    hidden = layers.Dense(3, activation="relu", dtype=dtype)(inputs)
    return keras.Model(inputs, layers.Dense(2, dtype=dtype)(hidden))


def torch_twin(weights):
    """A torch MLP holding the Keras weights `weights` (a Keras kernel is a transposed torch weight)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    net = net.to(torch.float64 if weights[0].dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for parameter, value in zip(net.parameters(), weights, strict=True):
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(value.T)))
    return net


def twins(dtype="float64"):
    """The batch, a Keras MLP and its torch twin holding the same weights."""
    x, y = batch(dtype)
    model = keras_mlp(dtype)
    return x, y, model, torch_twin(model.get_weights())


def torch_weights(net):
    return [parameter.detach().numpy().T.copy() for parameter in net.parameters()]


def torch_optimizer(name, net, **hyper_parameters):
    """torch.optim.Adam or AdamW from Keras's argument names."""
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return optimizer_class(
        net.parameters(),
        lr=hyper_parameters.get("learning_rate", LEARNING_RATE),
        betas=(hyper_parameters["beta_1"], hyper_parameters["beta_2"]),
        eps=hyper_parameters["epsilon"],
        weight_decay=hyper_parameters.get("weight_decay", 0.0),
        amsgrad=hyper_parameters.get("amsgrad", False),
    )


def torch_steps(net, optimizer, x, y, steps=STEPS, learning_rates=None, skipped=()):
    """The weights after each of `steps` torch steps (a step in `skipped` is left out, as GradScaler does)."""
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    history = []
    for step in range(steps):
        if step not in skipped:
            if learning_rates is not None:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rates[step]
            optimizer.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            optimizer.step()
        history.append(torch_weights(net))
    return history


def keras_steps(model, optimizer, x, y, steps=STEPS, compiled=True):
    """The weights after each of `steps` steps of a custom train step (a `tf.function` or eager)."""

    def train_step():
        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(model(x, training=True) - y))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    step_function = tf.function(train_step) if compiled else train_step
    history = []
    for _ in range(steps):
        step_function()
        history.append(model.get_weights())
    return history


def largest_gap(history_a, history_b):
    """The largest absolute difference of any weight at any step."""
    assert len(history_a) == len(history_b)
    return max(
        float(np.abs(a - b).max())
        for weights_a, weights_b in zip(history_a, history_b, strict=True)
        for a, b in zip(weights_a, weights_b, strict=True)
    )


def assert_close_float32(history_a, history_b):
    """Equal within float32 round-off: relative to each weight tensor's largest entry, at every step."""
    for weights_a, weights_b in zip(history_a, history_b, strict=True):
        for a, b in zip(weights_a, weights_b, strict=True):
            np.testing.assert_allclose(a, b, rtol=0.0, atol=RELATIVE_TOLERANCE_FLOAT32 * np.abs(b).max())


def gap_to_torch(keras_optimizer, torch_name, torch_hyper_parameters, compiled=True):
    """Train the float64 MLP with `keras_optimizer` and its twin with torch; the largest weight gap."""
    x, y, model, net = twins()
    history_torch = torch_steps(net, torch_optimizer(torch_name, net, **torch_hyper_parameters), x, y)
    return largest_gap(keras_steps(model, keras_optimizer, x, y, compiled=compiled), history_torch)


# ---- step for step against torch ----


@pytest.mark.parametrize("compiled", [True, False], ids=["tf.function", "eager"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_steps_equal_torch_in_float64(name, amsgrad, compiled):
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY, "amsgrad": amsgrad}
    optimizer_class = TorchAdam if name == "adam" else TorchAdamW
    keras_optimizer = optimizer_class(LEARNING_RATE, **hyper_parameters)
    assert gap_to_torch(keras_optimizer, name, hyper_parameters, compiled) < TOLERANCE_FLOAT64


def test_torch_defaults_equal_torch_in_float64():
    # Default betas and epsilon (1e-8); no weight decay for Adam, 1e-2 for AdamW.
    defaults = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8}
    assert gap_to_torch(TorchAdam(LEARNING_RATE), "adam", defaults) < TOLERANCE_FLOAT64
    adamw_defaults = {**defaults, "weight_decay": 1e-2}
    assert gap_to_torch(TorchAdamW(LEARNING_RATE), "adamw", adamw_defaults) < TOLERANCE_FLOAT64


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_steps_equal_torch_in_float32(name):
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y, model, net = twins("float32")
    history_torch = torch_steps(net, torch_optimizer(name, net, **hyper_parameters), x, y)
    optimizer = optimizers.make_optimizer(name, LEARNING_RATE, **hyper_parameters)
    assert_close_float32(keras_steps(model, optimizer, x, y), history_torch)


def test_learning_rate_schedule_equals_torch():
    # Both the Adam step and the decoupled decay use the scheduled rate of their own step.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=4, decay_rate=0.5)
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y, model, net = twins()
    learning_rates = [float(schedule(step)) for step in range(STEPS)]
    assert learning_rates[0] > 2 * learning_rates[-1]
    history_torch = torch_steps(
        net, torch_optimizer("adamw", net, **hyper_parameters), x, y, learning_rates=learning_rates
    )
    history_keras = keras_steps(model, TorchAdamW(schedule, **hyper_parameters), x, y)
    assert largest_gap(history_keras, history_torch) < TOLERANCE_FLOAT64


def test_excluded_variables_are_not_decayed():
    # exclude_from_weight_decay = a torch parameter group with weight_decay 0 (here: the biases).
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y, model, net = twins()
    weights, biases = [net[0].weight, net[2].weight], [net[0].bias, net[2].bias]
    torch_adam = torch.optim.Adam(
        [{"params": weights}, {"params": biases, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.5, 0.999),
        eps=1e-3,
        weight_decay=WEIGHT_DECAY,
    )
    history_torch = torch_steps(net, torch_adam, x, y)
    keras_adam = TorchAdam(LEARNING_RATE, **hyper_parameters)
    keras_adam.exclude_from_weight_decay(var_names=["bias"])
    assert largest_gap(keras_steps(model, keras_adam, x, y), history_torch) < TOLERANCE_FLOAT64


# ---- the comparison catches a wrong update rule ----


@pytest.mark.parametrize(
    ("keras_optimizer", "torch_name"),
    [
        # Keras's own Adam and AdamW: epsilon added before the bias correction.
        (lambda: keras.optimizers.Adam(LEARNING_RATE, **HYPER_PARAMETERS), "adam"),
        (
            lambda: keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY, **HYPER_PARAMETERS),
            "adamw",
        ),
        # Weight decay in the wrong form: L2 where torch decouples it, and the reverse.
        (lambda: TorchAdam(LEARNING_RATE, weight_decay=WEIGHT_DECAY, **HYPER_PARAMETERS), "adamw"),
        (lambda: TorchAdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY, **HYPER_PARAMETERS), "adam"),
    ],
    ids=["keras-adam", "keras-adamw", "l2-for-adamw", "decoupled-for-adam"],
)
def test_a_different_update_rule_fails_the_comparison(keras_optimizer, torch_name):
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    gap = gap_to_torch(keras_optimizer(), torch_name, hyper_parameters)
    assert gap > 1e-5, gap  # far above TOLERANCE_FLOAT64 and above float32's own round-off


def test_keras_convention_differs_from_torch_by_the_epsilon_placement_alone():
    # The same hyper-parameters through the factory. With epsilon 0 the two conventions coincide (in
    # float32: in float64, Keras's AdamW rounds beta_2 and the weight decay to float32 first).
    histories = {}
    for epsilon in (1e-3, 0.0):
        for convention in optimizers.CONVENTIONS:
            x, y = batch("float32")
            model = keras_mlp("float32")
            hyper_parameters = {**HYPER_PARAMETERS, "epsilon": epsilon, "weight_decay": WEIGHT_DECAY}
            optimizer = optimizers.make_optimizer(
                "adamw", LEARNING_RATE, convention=convention, **hyper_parameters
            )
            histories[epsilon, convention] = keras_steps(model, optimizer, x, y)
    assert_close_float32(histories[0.0, "keras"], histories[0.0, "torch"])
    assert largest_gap(histories[1e-3, "keras"], histories[1e-3, "torch"]) > 1e-3


# ---- one step's shared scalars ----


class PerVariableTorchAdamW(TorchAdamW):
    """TorchAdamW with every scalar built again for each variable and sqrt(v) divided by the root of
    the second bias correction: the step written out plainly, the reference of the shared form."""

    def apply(self, grads, trainable_variables=None):
        return keras.optimizers.Optimizer.apply(self, grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        self.assign(variable, ops.multiply(variable, 1 - learning_rate * ops.cast(self.weight_decay, dtype)))
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        momentum, velocity = self._momentums[index], self._velocities[index]
        self.assign_add(momentum, ops.multiply(ops.subtract(gradient, momentum), 1 - beta_1))
        self.assign(
            velocity, ops.add(ops.multiply(velocity, beta_2), ops.multiply(ops.square(gradient), 1 - beta_2))
        )
        root = ops.sqrt(1 - ops.power(beta_2, step))
        denominator = ops.add(ops.divide(ops.sqrt(velocity), root), ops.cast(self.epsilon, dtype))
        step_size = ops.divide(learning_rate, 1 - ops.power(beta_1, step))
        self.assign_sub(variable, ops.divide(ops.multiply(momentum, step_size), denominator))


def test_a_compiled_step_builds_its_scalars_once_and_rounds_as_the_per_variable_step():
    # Six layers, twelve variables: the bias corrections are built once per step (two powers, one
    # reciprocal root), the second moment's root once per variable.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), *[layers.Dense(4, activation="tanh") for _ in range(6)]])
    optimizer = TorchAdamW(LEARNING_RATE, **HYPER_PARAMETERS)
    optimizer.build(model.trainable_variables)
    gradients = [ops.ones_like(variable) for variable in model.trainable_variables]
    graph = tf.function(lambda: optimizer.apply(gradients, model.trainable_variables)).get_concrete_function()
    kinds = [operation.type for operation in graph.graph.get_operations()]
    assert (kinds.count("Pow"), kinds.count("Rsqrt"), kinds.count("Sqrt")) == (2, 1, 12)
    # Compiled, the shared form takes bit for bit the steps of the plain per-variable step, in which
    # TensorFlow's graph optimizer turns each quotient by a root into a product with its reciprocal.
    # Eager, the two differ in the last bit; the shared form's eager steps equal its compiled ones.
    x, y = batch("float32")
    y = np.tanh(np.concatenate([y, y], axis=1))
    histories = {}
    for name, optimizer_class, compiled in [
        ("shared", TorchAdamW, True),
        ("shared eager", TorchAdamW, False),
        ("per variable", PerVariableTorchAdamW, True),
    ]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), *[layers.Dense(4, activation="tanh") for _ in range(6)]])
        optimizer = optimizer_class(LEARNING_RATE, weight_decay=WEIGHT_DECAY, **HYPER_PARAMETERS)
        histories[name] = keras_steps(model, optimizer, x, y, steps=5, compiled=compiled)
    assert largest_gap(histories["shared"], histories["per variable"]) == 0.0
    assert largest_gap(histories["shared"], histories["shared eager"]) == 0.0


# ---- Keras machinery: fit, loss scaling, distribution, saving ----


def fit_steps(model, optimizer, x, y, steps):
    model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError())
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fit_equals_torch(name):
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y, model, net = twins("float32")
    history_torch = torch_steps(net, torch_optimizer(name, net, **hyper_parameters), x, y, steps=3)
    fit_steps(model, optimizers.make_optimizer(name, LEARNING_RATE, **hyper_parameters), x, y, steps=3)
    assert_close_float32([model.get_weights()], history_torch[-1:])


def test_loss_scale_optimizer_equals_torch_and_skips_a_non_finite_step():
    # As torch's GradScaler: a step with non-finite gradients is skipped and does not count for the
    # bias correction; the loss scale is halved and the next step goes on as if it had not happened.
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y, model, net = twins("float32")
    history_torch = torch_steps(net, torch_optimizer("adamw", net, **hyper_parameters), x, y, skipped=(5,))
    optimizer = keras.optimizers.LossScaleOptimizer(TorchAdamW(LEARNING_RATE, **hyper_parameters))
    poison = tf.Variable(1.0)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(model(x, training=True) - y))
            scaled_loss = optimizer.scale_loss(loss) * poison
        optimizer.apply(tape.gradient(scaled_loss, model.trainable_variables), model.trainable_variables)

    history_keras = []
    for step in range(STEPS):
        poison.assign(np.inf if step == 5 else 1.0)
        train_step()
        history_keras.append(model.get_weights())
    assert_close_float32(history_keras, history_torch)
    assert int(optimizer.inner_optimizer.iterations) == STEPS - 1


def test_mixed_precision_fit_wraps_and_follows_torch():
    # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer; the float16 forward
    # pass leaves the weights near the float32 torch run (not equal: the gradients are rounded).
    x, y, model, net = twins("float32")
    history_torch = torch_steps(net, torch_optimizer("adam", net, **HYPER_PARAMETERS), x, y, steps=3)
    weights = model.get_weights()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras_mlp(None)
        model.set_weights(weights)
        fit_steps(model, TorchAdam(LEARNING_RATE, **HYPER_PARAMETERS), x, y, steps=3)
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, TorchAdam)
    assert int(model.optimizer.iterations) == 3
    assert largest_gap([model.get_weights()], history_torch[-1:]) < 1e-3


def test_fit_under_a_mirrored_strategy_equals_torch():
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y = batch("float32")
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = keras_mlp("float32")
        optimizer = TorchAdamW(LEARNING_RATE, **hyper_parameters)
        net = torch_twin(model.get_weights())
        history_torch = torch_steps(net, torch_optimizer("adamw", net, **hyper_parameters), x, y, steps=3)
        fit_steps(model, optimizer, x, y, steps=3)
    assert_close_float32([model.get_weights()], history_torch[-1:])


def two_replica_fit(input_path, output_path):
    """The worker: `fit` with the weights and batch of `input_path` on two CPU replicas, weights saved."""
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    arrays = np.load(input_path)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        model = keras_mlp("float32")
        model.set_weights([arrays[f"weight_{index}"] for index in range(4)])
        optimizer = TorchAdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY, **HYPER_PARAMETERS)
        fit_steps(model, optimizer, arrays["x"], arrays["y"], steps=3)
    np.savez(output_path, *model.get_weights())


@pytest.mark.slow
def test_fit_on_two_mirrored_replicas_equals_torch(tmp_path):
    # Each replica sees half of the batch; the all-reduced gradient and the update equal one torch step.
    hyper_parameters = {**HYPER_PARAMETERS, "weight_decay": WEIGHT_DECAY}
    x, y = batch("float32")
    weights = keras_mlp("float32").get_weights()
    np.savez(tmp_path / "input.npz", x=x, y=y, **{f"weight_{index}": w for index, w in enumerate(weights)})
    completed = subprocess.run(
        [sys.executable, __file__, tmp_path / "input.npz", tmp_path / "output.npz"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = np.load(tmp_path / "output.npz")
    net = torch_twin(weights)
    history_torch = torch_steps(net, torch_optimizer("adamw", net, **hyper_parameters), x, y, steps=3)
    assert_close_float32([[output[f"arr_{index}"] for index in range(4)]], history_torch[-1:])


@pytest.mark.parametrize(
    "make",
    [
        lambda: TorchAdam(LEARNING_RATE, weight_decay=WEIGHT_DECAY, amsgrad=True, **HYPER_PARAMETERS),
        lambda: TorchAdamW(
            keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=4, decay_rate=0.5),
            weight_decay=WEIGHT_DECAY,
            clipnorm=1.0,
            **HYPER_PARAMETERS,
        ),
    ],
    ids=["adam-amsgrad", "adamw-schedule"],
)
def test_keras_file_keeps_the_optimizer_and_its_state(tmp_path, make):
    x, y = batch("float32")
    model = keras_mlp("float32")
    fit_steps(model, make(), x, y, steps=2)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(saved, restored)
    # Training on from the file takes the same steps as training on in memory.
    for trained in (model, loaded):
        trained.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)
    assert largest_gap([loaded.get_weights()], [model.get_weights()]) == 0.0


# ---- factory and flag ----


def test_make_optimizer_builds_both_conventions_with_torch_defaults():
    expected_classes = {
        ("adam", "torch"): TorchAdam,
        ("adamw", "torch"): TorchAdamW,
        ("adam", "keras"): keras.optimizers.Adam,
        ("adamw", "keras"): keras.optimizers.AdamW,
    }
    for (name, convention), expected_class in expected_classes.items():
        optimizer = optimizers.make_optimizer(name.upper(), 1e-3, convention=convention)
        assert type(optimizer) is expected_class
        config = optimizer.get_config()
        assert config["epsilon"] == 1e-8 and (config["beta_1"], config["beta_2"]) == (0.9, 0.999)
        assert config["weight_decay"] in ((0.0, None) if name == "adam" else (1e-2,))
        assert config["amsgrad"] is False
    torch_config = optimizers.make_optimizer("adamw", 1e-3, beta_1=0.5, weight_decay=0.1).get_config()
    keras_config = optimizers.make_optimizer(
        "adamw", 1e-3, convention="keras", beta_1=0.5, weight_decay=0.1
    ).get_config()
    assert {key: torch_config[key] for key in keras_config if key != "name"} == {
        key: value for key, value in keras_config.items() if key != "name"
    }


def test_make_optimizer_refuses_unknown_names_and_conventions():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optimizers.make_optimizer("sgd", 1e-3)
    with pytest.raises(ValueError, match="unknown optimizer convention 'jax'"):
        optimizers.make_optimizer("adam", 1e-3, convention="jax")
    with pytest.raises(ValueError, match="Adam with weight decay has no Keras form"):
        optimizers.make_optimizer("adam", 1e-3, convention="keras", weight_decay=1e-4)
    with pytest.raises(ValueError, match="beta_1 and beta_2 must be in"):
        optimizers.make_optimizer("adam", 1e-3, beta_2=1.0)


def test_optimizer_convention_flag():
    parser = cli.Parser()
    cli.add_optimizer_convention_argument(parser)
    assert parser.parse_args([]).optimizer_convention == "torch"
    assert parser.parse_args("--optimizer_convention keras".split()).optimizer_convention == "keras"
    with pytest.raises(SystemExit):
        parser.parse_args("--optimizer_convention jax".split())
    assert "bias correction" in parser.format_help()
    keras_default = cli.Parser()
    cli.add_optimizer_convention_argument(keras_default, default="keras")
    assert keras_default.parse_args([]).optimizer_convention == "keras"


if __name__ == "__main__":
    two_replica_fit(sys.argv[1], sys.argv[2])
