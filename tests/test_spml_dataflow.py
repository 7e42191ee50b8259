"""Data flow of the SPML losses, label-state updates and AdaGC's pieces (train_multilabel_model.py).

Each test uses hand-made inputs on which a one-line slip (a permuted term left unpermuted, an EMA whose two
weights are swapped, an observed entry treated as unobserved, a loss seeing the wrong target) changes the
result, not only the arithmetic of a formula.
"""

import numpy as np
import pytest
import tensorflow as tf

import train_multilabel_model as tm


def parse(argv=""):
    return tm.get_args_parser().parse_args(argv.split())


def rows_dataset(features, batch_size):
    return tf.data.Dataset.from_tensor_slices((features, np.arange(len(features)))).batch(batch_size)


# ---- ROLE through the torch-convention optimizer: the reference's estimates ----


def torch_role_estimates(weights, features, observed, initial, settings, steps, batch_size):
    """Cole et al.'s ROLE step in PyTorch: classifier and estimator in one Adam, the estimator's lr scaled."""
    import torch

    torch.manual_seed(0)
    dense = [torch.tensor(w.T.copy() if w.ndim == 2 else w.copy(), requires_grad=True) for w in weights]
    estimator = torch.tensor(initial.copy(), requires_grad=True)
    lr = settings.learning_rate
    optimizer = torch.optim.Adam(
        [{"params": dense, "lr": lr}, {"params": [estimator], "lr": lr * settings.role_lr_multiplier}]
    )
    x_all, y_all = torch.tensor(features), torch.tensor(observed)
    k, classes = settings.expected_num_positives, observed.shape[1]
    for step in range(steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(features)
        x, y = x_all[rows], y_all[rows]
        hidden = torch.relu(x @ dense[0].T + dense[1])
        logits = hidden @ dense[2].T + dense[3]
        est_logits = estimator[rows]
        preds, ests = torch.sigmoid(logits), torch.sigmoid(est_logits)
        softplus = torch.nn.functional.softplus
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        pos = y * (softplus(-logits) + softplus(-est_logits)) * 0.5
        cross = 0.5 * (
            bce(logits, ests.detach(), reduction="none") + bce(est_logits, preds.detach(), reduction="none")
        )
        prior = ((preds.sum(1).mean() - k) ** 2 + (ests.sum(1).mean() - k) ** 2) * 0.5 / classes**2
        loss = (pos + cross).mean() + prior
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return estimator.detach().numpy()


@pytest.mark.parametrize(
    "optimizer, close",
    [("--optimizer_convention torch", True), ("--optimizer_convention keras --adam_epsilon 1e-7", False)],
)
def test_role_estimates_match_the_torch_reference_with_torchs_adam(optimizer, close):
    """Torch's Adam with its 1e-8 epsilon gives the reference's estimates; Keras's Adam as it was does not."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(16, 6)).astype(np.float32)
    full = (rng.random((16, 5)) < 0.4).astype(np.float32)
    full[np.arange(16), rng.integers(0, 5, 16)] = 1
    observed = np.zeros_like(full)
    observed[np.arange(16), full.argmax(1)] = 1
    settings = parse(
        "--method role --backbone mlp --expected_num_positives 2 --learning_rate 1e-3 --batch_size 8 "
        + optimizer
    )
    tf.keras.utils.set_random_seed(0)
    trainer = tm.make_trainer(
        settings, lambda: tm.build_classifier("mlp", (6,), 5), {"observed": observed, "full": full}
    )
    initial = trainer.estimator.numpy().copy()
    weights = [w.numpy().astype(np.float32) for w in trainer.student.trainable_variables]
    for epoch in (1, 2, 3):
        trainer.train_epoch(rows_dataset(features, 8), "warmup", epoch)
    ours = tm.tf.sigmoid(trainer.estimator).numpy()
    reference = torch_role_estimates(weights, features, observed, initial, settings, 6, 8)
    gap = np.abs(ours - 1 / (1 + np.exp(-reference))).max()
    print(optimizer, gap)
    assert (gap < 1e-4) == close, gap
