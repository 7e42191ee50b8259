"""The paper-size step of every GPU-bound script on one GPU: images/s and peak GPU memory, float32 and
mixed precision.

Workloads (random weights and random inputs; each the step its script runs):
- SPML ResNet-50 at 224 px, batch 64 (train_multilabel_model.py: `SpmlTrainer`'s compiled AN step);
- SegFormer on EfficientNet-B0 and -B7 at 256 px, batch 24 (segmentation_train.py: its model, Dice
  loss and torch-convention AdamW with global clipnorm, trained by `fit`);
- the SPADE GAN at 256 px with the paper's widths, batch 50 (generative_trainer_unet_spade_gan.py:
  one D and one G update);
- the LUCAS probe: the MLP head on TerraMind-base tokens `(196, 768)`, batch 8, compiled as
  train_lucas_classifier.py compiles it (`steps_per_execution=16`);
- TerraMind-v1-base extraction of 6-band 224 px chips, batch 8 (extract_terramind_embeddings.py's
  Keras encoder, `predict_on_batch`);
- a Qwen3-VL-8B-sized caption batch (vision_language_captioner.py's model class with the 8B
  configuration and random weights): 32 patches of 256 px, greedy, 100 new tokens.
Precision: float32, then mixed (Keras `mixed_float16`; bfloat16 weights for the captioner, as the
script runs it). Each row: the median of `--steps` timed steps after `--warmup` untimed ones, images
per second and the peak device memory of that workload. `--tiny` runs every workload at tiny sizes
on the CPU (the test suite does, so the bench cannot rot); without a GPU mixed precision is skipped.

    python -m bench.gpu_speed                    # on a GPU machine; minutes
    python -m bench.gpu_speed --tiny             # seconds, on the CPU
    python -m bench.gpu_speed --workloads spml,segformer_b0 --precisions float32
"""

import argparse
import statistics
import time
from types import SimpleNamespace

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf

from bench import measure

WORKLOADS = ("spml", "segformer_b0", "segformer_b7", "spade_gan", "lucas_probe", "terramind", "caption")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="Comma-separated, of " + ", ".join(WORKLOADS)
    )
    parser.add_argument("--precisions", default="float32,mixed", help="float32 and/or mixed.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per workload (median kept).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (tracing, autotuning).")
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes on the CPU (for the tests).")
    return parser


# ---- device memory ----


def tf_peak_reset():
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def tf_peak_gib():
    if not tf.config.list_physical_devices("GPU"):
        return float("nan")
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30


# ---- the Keras workloads: (step function, images per step) ----


def spml_step(tiny):
    import train_multilabel_model as spml_script
    from common.spml import single_positives

    size, batch, classes = (32, 2, 17) if tiny else (224, 64, 17)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    full = (rng.random((batch, classes)) < 0.2).astype(np.float32)
    full[np.arange(batch), rng.integers(classes, size=batch)] = 1.0
    observed = single_positives.single_positive_random(full, 0)
    settings = SimpleNamespace(method="an", learning_rate=1e-4, seed=0, delta_rel=0.0)

    def build_model():
        mean, variance = np.full(3, 127.0, np.float32), np.full(3, 60.0**2, np.float32)
        return spml_script.build_classifier("resnet50", (size, size, 3), classes, mean, variance)

    trainer = spml_script.SpmlTrainer(
        settings, tf.distribute.get_strategy(), build_model, keras.optimizers.Adam, observed, full
    )
    data = tf.data.Dataset.from_tensor_slices((images, np.arange(batch, dtype=np.int32))).batch(batch).cache()
    epoch = iter(range(1, 10**9))
    return lambda: trainer.train_epoch(data, "warmup", next(epoch)), batch


def segformer_step(encoder, tiny):
    import segmentation_train as st
    from common.aras400k import classes

    script = st.get_args_parser().parse_args([])
    size, batch = (32, 2) if tiny else (256, script.batch_size)
    model = st.build_segformer(encoder, size)
    st.compile_as_trained(model, script, st.MulticlassDiceLoss())
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
    masks = rng.integers(0, classes.NUM_CLASSES, (batch, size, size)).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, masks)).repeat()
    return lambda: model.fit(data, steps_per_epoch=1, verbose=0), batch


def spade_gan_step(tiny):
    from bench import spade_gan_speed

    size, divisor, batch = (32, 16, 2) if tiny else (256, 1, 50)
    model = spade_gan_speed.make_keras_model(size, divisor, False, False)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, spade_gan_speed.LABELS, (batch, size, size))
    masks = tf.constant(np.eye(spade_gan_speed.LABELS, dtype=np.float32)[labels])
    real = tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
    return lambda: float(model.train_step(real, masks)[0]), batch


def lucas_probe_step(tiny):
    import train_lucas_classifier as lucas_script
    from common import optimizers

    script = lucas_script.get_args_parser().parse_args([])
    tokens, dim = (4, 16) if tiny else (196, 768)
    batch, num_classes, per_call = script.batch_size, len(lucas_script.CLASS_NAMES), 16
    head = lucas_script.build_head((tokens, dim), num_classes, "mlp", None, 0.1)
    head.compile(
        optimizer=optimizers.make_optimizer(
            "adamw", script.learning_rate, convention="torch", weight_decay=script.weight_decay
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=per_call,
        jit_compile=False,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * per_call, tokens, dim)).astype(np.float32)
    y = rng.integers(num_classes, size=batch * per_call).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    return lambda: head.fit(data, steps_per_epoch=per_call, verbose=0), batch * per_call


def terramind_step(tiny):
    import extract_terramind_embeddings as extractor
    from common.lucas import lucas_chips

    config = extractor.VARIANTS["tiny" if tiny else "base"]
    size, batch = (32, 2) if tiny else (224, 8)
    bands = len(lucas_chips.BAND_NAMES)
    model = extractor.build_encoder(config, size, bands, config.depth - 1)
    chips = np.random.default_rng(0).normal(size=(batch, size, size, bands)).astype(np.float32)
    return lambda: np.asarray(model.predict_on_batch(chips)), batch


# ---- the captioner (PyTorch) ----


def qwen3_vl_config(tiny):
    """Qwen3-VL-8B-Instruct's configuration (random weights), or a tiny one of the same family."""
    from transformers import Qwen3VLConfig

    if tiny:
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        text.update(num_key_value_heads=1, head_dim=16, vocab_size=512)
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
        }
        vision.update(deepstack_visual_indexes=[0], num_position_embeddings=64)
        mrope = [2, 3, 3]
    else:
        text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36}
        text.update(num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936)
        vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16}
        vision.update(
            out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304
        )
        mrope = [24, 20, 20]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope}
    text["rope_parameters"]["mrope_interleaved"] = True
    vision["patch_size"] = 16
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=text["vocab_size"] - 4,
        video_token_id=text["vocab_size"] - 3,
        vision_start_token_id=text["vocab_size"] - 2,
        vision_end_token_id=text["vocab_size"] - 1,
    )


def caption_step(tiny, mixed):
    """Greedy generation for a batch of patches: the text prompt, then the image's merged patch tokens."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = qwen3_vl_config(tiny)
    dtype = torch.bfloat16 if mixed else torch.float32
    batch, size, new_tokens, prompt = (2, 32, 4, 8) if tiny else (32, 256, 100, 60)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    grid = size // 16  # patches per side; 2 x 2 patches merge into one token
    image_tokens = (grid // 2) ** 2
    row = (
        [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    )
    text = torch.randint(0, config.text_config.vocab_size - 8, (batch, prompt))
    input_ids = torch.cat([torch.tensor([row] * batch), text], 1).to(device)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        # Qwen's processor flattens each image into (grid_t * grid_h * grid_w) rows of 3 x 2 x 16 x 16.
        "pixel_values": torch.randn(batch * grid * grid, 3 * 2 * 16 * 16, device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
    }

    def step():
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, batch


# ---- running ----


def timed_workload(name, precision, args):
    """(seconds per step, images per step, peak GiB) of one workload at one precision."""
    mixed = precision == "mixed"
    if name == "caption":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        step, images = caption_step(args.tiny, mixed)
    else:
        keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
        tf_peak_reset()
        builders = {
            "spml": spml_step,
            "segformer_b0": lambda tiny: segformer_step("efficientnetb0", tiny),
            "segformer_b7": lambda tiny: segformer_step("efficientnetb7", tiny),
            "spade_gan": spade_gan_step,
            "lucas_probe": lucas_probe_step,
            "terramind": terramind_step,
        }
        step, images = builders[name](args.tiny)
    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    if name == "caption":
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    else:
        peak = tf_peak_gib()
        keras.mixed_precision.set_global_policy("float32")
    return statistics.median(seconds), images, peak


def device_name():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({measure.cores()} cores), no GPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", "GPU")


def main(args):
    from common.reports import markdown_table

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    precisions = args.precisions.split(",")
    if not has_gpu and "mixed" in precisions and not args.tiny:
        print("no GPU: mixed precision skipped (float16 is slower on a CPU)")
        precisions = [p for p in precisions if p != "mixed"]
    print(f"device: {device_name()}; {measure.machine_line()}")
    rows = []
    for name in args.workloads.split(","):
        for precision in precisions:
            seconds, images, peak = timed_workload(name, precision, args)
            rows.append(
                [name, precision, images, f"{1e3 * seconds:.1f}", f"{images / seconds:.2f}", f"{peak:.2f}"]
            )
            print(f"  {name} {precision}: {images / seconds:.2f} images/s, peak {peak:.2f} GiB", flush=True)
    header = ["workload", "precision", "images/step", "ms/step", "images/s", "peak GiB"]
    print(markdown_table(header, rows), end="")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
