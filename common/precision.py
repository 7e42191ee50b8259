"""Mixed precision: the one --mixed_precision flag and the compute type it picks on this machine.

With the flag, a GPU computes in float16 (Keras policy `mixed_float16`, loss scaling by
`model.compile`) and a CPU with bfloat16 instructions (avx512_bf16, amx_bf16, or aarch64 bf16) in
bfloat16 (`mixed_bfloat16`). Variables, logits and losses stay float32: each script gives its output
layer `dtype="float32"` (or casts its logits). Where neither helps (no GPU, no bfloat16 on the CPU)
the run prints one note and computes in float32. `auto` (the LUCAS study's setting) asks for
float16 only on a GPU of compute capability 7.0 or newer and is silent otherwise.
Torch scripts get the same choice as a `torch.autocast` context (`torch_autocast`).
"""

import argparse
import contextlib
import functools
import platform
from pathlib import Path

from common.cli import str2bool

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Old spellings of train_lucas_classifier.py's --precision, read as the new flag's values.
_LEGACY_VALUES = {"mixed16": True, "float32": False}
_MESSAGE = "mixed precision: {} compute, float32 variables, logits and losses"
_NO_GAIN = "note: --mixed_precision needs a GPU or a CPU with bfloat16 instructions; running in float32"


def parse_mode(value):
    """--mixed_precision's value: True / False (true/false, on/off, 1/0, yes/no) or "auto"."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in _LEGACY_VALUES:
        return _LEGACY_VALUES[text]
    return str2bool(value)


def add_argument(parser: argparse.ArgumentParser, default=False) -> None:
    """--mixed_precision [true|false|auto]: typed alone it means true."""
    parser.add_argument(
        "--mixed_precision",
        type=parse_mode,
        nargs="?",
        const=True,
        default=default,
        metavar="{true,false,auto}",
        help="Mixed precision: float16 on a GPU, bfloat16 on a CPU with bf16 instructions, float32 logits "
        "and losses; elsewhere a note and float32. auto: float16 on GPUs of compute capability >= 7 only.",
    )


@functools.cache
def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (x86 avx512_bf16 / amx_bf16, aarch64 bf16)."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def gpu_compute_capabilities() -> list:
    """[(major, minor)] of the GPUs TensorFlow sees ((0, 0) where unknown)."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return capabilities


def choose_policy(mode, gpu_capabilities, cpu_bfloat16: bool) -> tuple[str, str]:
    """(Keras policy name, one-line message) for --mixed_precision `mode` on this hardware."""
    if mode is False:
        return "float32", ""
    if gpu_capabilities:
        if mode == "auto" and min(gpu_capabilities) < (7, 0):
            return "float32", ""
        return "mixed_float16", _MESSAGE.format("mixed_float16")
    if mode == "auto":
        return "float32", ""
    if cpu_bfloat16:
        return "mixed_bfloat16", _MESSAGE.format("mixed_bfloat16")
    return "float32", _NO_GAIN


def apply(mode) -> str:
    """Set Keras's global policy for `mode` on this machine (float32 when off), print its line, and
    return the policy name. Call it before the model is built."""
    import keras

    cpu_bfloat16 = mode is True and cpu_supports_bfloat16()
    policy, message = choose_policy(mode, gpu_compute_capabilities() if mode else [], cpu_bfloat16)
    keras.mixed_precision.set_global_policy(policy)
    if message:
        print(message, flush=True)
    return policy


def torch_autocast(mode, device):
    """A `torch.autocast` context for `mode` on the torch `device` (float16 on CUDA, bfloat16 on a CPU
    with bf16 instructions), printing the same line as `apply`; a null context when off."""
    import torch

    device = torch.device(device)
    gpus = [torch.cuda.get_device_capability(device)] if device.type == "cuda" else []
    policy, message = choose_policy(mode, gpus, mode is True and cpu_supports_bfloat16())
    if message:
        print(message, flush=True)
    if policy == "float32":
        return contextlib.nullcontext()
    dtype = torch.float16 if policy == "mixed_float16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_scaled(optimizer):
    """`optimizer` wrapped in Keras's dynamic LossScaleOptimizer under mixed_float16, else as it is.

    A custom training step then takes gradients of `optimizer.scale_loss(loss)` (the loss itself
    when not wrapped) and calls `optimizer.apply`, which unscales them and skips non-finite steps.
    """
    import keras

    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
