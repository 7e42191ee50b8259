"""--mixed_precision: the policy picked per machine, and each GPU-bound script's model computing in
bfloat16 (forced on this CPU) within tolerance of float32, with float32 outputs."""

import keras
import numpy as np
import pytest
import torch
from conftest import parse

import extract_terramind_embeddings as terramind
import generative_trainer_unet_spade_gan as gan
import segmentation_train as segmentation  # its flag; its model's float32 logits: test_segmentation_train
import train_lucas_classifier as lucas
import train_multilabel_model as spml
from common import precision

NOTE = "note: --mixed_precision needs a GPU or a CPU with bfloat16 instructions; running in float32"


@pytest.mark.parametrize(
    ("mode", "gpus", "cpu_bfloat16", "policy"),
    [
        (False, [(8, 0)], True, "float32"),
        (True, [(8, 0)], False, "mixed_float16"),
        (True, [], True, "mixed_bfloat16"),
        (True, [], False, "float32"),
        ("auto", [(7, 0)], False, "mixed_float16"),
        ("auto", [(6, 1)], False, "float32"),
        ("auto", [], True, "float32"),
    ],
)
def test_policy_per_machine(mode, gpus, cpu_bfloat16, policy):
    chosen, message = precision.choose_policy(mode, gpus, cpu_bfloat16)
    assert chosen == policy
    if policy == "float32":
        assert message == (NOTE if mode is True else "")
    else:
        assert message == f"mixed precision: {policy} compute, float32 variables, logits and losses"


def test_flag_values_and_the_lucas_alias(capsys):
    assert [precision.parse_mode(v) for v in ("true", "off", "auto", "mixed16", "float32")] == [
        True,
        False,
        "auto",
        True,
        False,
    ]
    assert parse(spml, ["--mixed_precision"]).mixed_precision is True
    assert parse(spml, []).mixed_precision is False
    assert parse(lucas, []).mixed_precision == "auto"  # the study's GPU setting
    assert parse(lucas, ["--precision", "mixed16"]).mixed_precision is True
    assert "--precision is now --mixed_precision" in capsys.readouterr().err
    for script in (spml, gan, segmentation, lucas, terramind):
        assert "mixed_precision" in script.RESUME_SETTINGS, script.__name__


def test_without_gpu_or_bfloat16_a_note_and_float32(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: False)
    monkeypatch.setattr(precision, "gpu_compute_capabilities", lambda: [])
    try:
        assert precision.apply(True) == "float32"
        assert capsys.readouterr().out.strip() == NOTE
        assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def outputs_in_both_policies(monkeypatch, build, inputs):
    """Outputs of `build()` in float32 and, with the same weights, under --mixed_precision forced to
    bfloat16 (as on a CPU with bf16 instructions)."""
    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: True)
    monkeypatch.setattr(precision, "gpu_compute_capabilities", lambda: [])
    try:
        assert precision.apply(False) == "float32"
        reference = build()
        expected = [np.asarray(reference(x, training=False)) for x in inputs]
        assert precision.apply(True) == "mixed_bfloat16"
        model = build()
        model.set_weights(reference.get_weights())
        outputs = [model(x, training=False) for x in inputs]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return expected, outputs


def assert_close_in_float32(expected, outputs, tolerance=0.05):
    for want, got in zip(expected, outputs, strict=True):
        assert got.dtype == "float32"  # logits and outputs stay float32
        scale = max(float(np.abs(want).max()), 1.0)
        assert float(np.abs(np.asarray(got) - want).max()) <= tolerance * scale


def test_spml_classifier_in_bfloat16(monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 24, 24, 3)).astype(np.float32)

    def build():
        keras.utils.set_random_seed(0)
        return spml.build_classifier("small_cnn", (24, 24, 3), 5, np.full(3, 0.5), np.full(3, 0.1))

    assert_close_in_float32(*outputs_in_both_policies(monkeypatch, build, [images]))


def test_spade_gan_in_bfloat16(monkeypatch):
    rng = np.random.default_rng(1)
    masks = np.eye(gan.NUM_CLASSES, dtype=np.float32)[rng.integers(0, gan.NUM_CLASSES, (2, 32, 32))]
    pairs = rng.normal(size=(2, 32, 32, gan.NUM_CLASSES + 3)).astype(np.float32)
    for build, x in (
        (lambda: gan.build_generator(32, 32), masks),
        (lambda: gan.build_discriminator(32, 32), pairs),
    ):
        expected, outputs = outputs_in_both_policies(monkeypatch, build, [x])
        if outputs[0].dtype != "float32":  # the discriminator's logits are cast in its losses
            loss = gan.generator_hinge_loss(outputs[0])
            assert loss.dtype == "float32" and abs(float(loss) - float(-expected[0].mean())) < 0.05
            outputs = [keras.ops.cast(outputs[0], "float32")]
        assert_close_in_float32(expected, outputs)


def test_lucas_cnn_and_head_in_bfloat16(monkeypatch):
    chips = np.random.default_rng(3).normal(size=(4, 32, 32, 6)).astype(np.float32)

    def build():
        keras.utils.set_random_seed(0)
        backbone = lucas.simple_cnn((32, 32, 6))
        tokens = keras.layers.Reshape((-1, backbone.output.shape[-1]))(backbone.output)
        head = lucas.build_head(tokens.shape[1:], 4, "mlp", 16, 0.0)
        return keras.Model(backbone.input, head(tokens))

    assert_close_in_float32(*outputs_in_both_policies(monkeypatch, build, [chips]))


def test_terramind_encoder_in_bfloat16(monkeypatch):
    chips = np.random.default_rng(4).normal(size=(2, 32, 32, 6)).astype(np.float32)
    config = terramind.EncoderConfig(dim=48, depth=2, num_heads=3, bias=True, gated_mlp=False)

    def build():
        keras.utils.set_random_seed(0)
        return terramind.build_encoder(config, 32, 6, 1)

    assert_close_in_float32(*outputs_in_both_policies(monkeypatch, build, [chips]))


def test_torch_autocast_in_bfloat16_on_this_cpu(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
        with precision.torch_autocast(True, "cpu"):
            mixed = model(x)
        with precision.torch_autocast(False, "cpu"):
            plain = model(x)
    assert "mixed_bfloat16" in capsys.readouterr().out
    assert mixed.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.equal(plain, expected)
    assert float((mixed.float() - expected).abs().max()) <= 0.05 * max(float(expected.abs().max()), 1.0)
