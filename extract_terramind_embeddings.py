"""TerraMind v1 tokens of the LUCAS chips, from a local checkpoint: the study's frozen-backbone features.

Source study: the TerraMind geospatial foundation model (IBM / ESA, arXiv 2504.11171) probed frozen on
LUCAS 2018 points in Italy (Politecnico di Milano, "Geospatial Foundation Models" project): 1,994
chips of 224 x 224 px, 6 bands [B4, B3, B2, B8, B11, B12]. The study ran terratorch's
`terramind_v1_base` on the raw S2L2A modality and took the tokens of encoder layer 11
(`SelectIndices [11]`, the last of 12, after the final norm) into its identity and MLP decoders.
This script computes those tokens with its Keras port of that encoder (the same numbers as
terratorch's encoder: test_keras_encoder_equals_the_reference_fixture) and writes them as the `.npy`
that `train_lucas_classifier.py --embeddings` reads: `(N, 196, D)` in labels-CSV order, D = 192 / 384
/ 768 / 1024 for tiny / small / base / large.

The encoder. TerraMind is a multimodal ViT; terratorch's `TerraMindViT` with the raw `S2L2A`
modality is the model the study probed. The port below follows that encoder path:
`ImageEncoderEmbedding` (16 px patches flattened pixel-major, band-minor, a bias-free linear
projection, fixed 2-D sin-cos position embedding, learned modality embedding), pre-norm transformer
blocks (GELU MLP with biases for v1 tiny/small, bias-free SiLU-gated MLP for v1 base/large), and the
final `encoder_norm`, which terratorch applies to the last layer's output only. Parameter names are
terratorch's (`encoder.3.attn.qkv.weight`, `encoder_embeddings.untok_sen2l2a@224.proj.weight`), so
the official `TerraMind_v1_<variant>.pt` or `.safetensors` loads by name. Unlike terratorch's
`ckpt_path` load (strict=False), a checkpoint that does not hold exactly the chosen variant's encoder
is refused with one line. tests/fixtures/make_terramind_fixture.py makes the reference tokens that
test_keras_encoder_equals_the_reference_fixture compares against.

Bands and scaling. The chips hold RED, GREEN, BLUE, NIR_BROAD (B8), SWIR_1, SWIR_2 as reflectance.
By default each chip band meets the patch-embedding weights pretrained for that band, and is
standardised as in TerraMind's pretraining: reflectance x 10000, minus the v1 S2L2A pretraining mean,
over its std. `--band_mapping study` feeds the chip bands to the weights of BLUE, GREEN, RED,
NIR_NARROW (B8A), SWIR_1, SWIR_2 as the study declared them (red and blue swapped, B8A for B8);
`--normalisation dataset` standardises with the per-band mean and std of all chips as the study did.
Both together reproduce the study exactly.

Commands:
    python extract_terramind_embeddings.py --data_root lucas_chips --checkpoint TerraMind_v1_base.pt
    python extract_terramind_embeddings.py --data_root lucas_chips --checkpoint TerraMind_v1_base.pt \\
        --band_mapping study --normalisation dataset --run_name study
    python extract_terramind_embeddings.py --demo

Runtime: the TerraMind-v1-base encoder runs at 3.4 chips/s of 224 px on a shared 2-core CPU
(`python -m bench.terramind_extraction_speed`; PyTorch reference 2.9 chips/s), so the 1,994 chips take
about 10 minutes; GPU speed was not measured. The demo (a randomly initialised TerraMind-v1-tiny-
shaped checkpoint, 243 synthetic 32 px chips, 2 x 2 tokens each, then `train_lucas_classifier.py
--embeddings <tokens> --grid`) takes about 35 s of CPU time and ends with the probe's summary line:
    summary (val, 1 seed): wce/identity OA 0.694+-0.000 macc 0.710+-0.000 mF1 0.676+-0.000; wce/mlp OA
    0.694+-0.000 macc 0.809+-0.000 mF1 0.751+-0.000; focal/identity OA 0.612+-0.000 macc 0.500+-0.000
    mF1 0.495+-0.000; focal/mlp OA 0.714+-0.000 macc 0.753+-0.000 mF1 0.734+-0.000
"""

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from common import cli, precision

# The chips' bands [B4, B3, B2, B8, B11, B12] in terratorch's band names, and the study's declaration.
BAND_MAPPINGS = {
    "correct": ["RED", "GREEN", "BLUE", "NIR_BROAD", "SWIR_1", "SWIR_2"],
    "study": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"],
}
VARIANT_NAMES = ("tiny", "small", "base", "large")


def get_args_parser():
    parser = cli.Parser(description="TerraMind v1 tokens of LUCAS chips from a local checkpoint.")
    add = parser.add_argument_group("data").add_argument
    add("--data_root", default=None, help="Folder of <STR18>/<Point_ID>.tif 6-band chips + labels CSV.")
    add("--labels_csv", default=None, help="Point_ID, STR18 CSV; default <data_root>/chips_LC_class.csv.")
    add("--band_mapping", default="correct", choices=list(BAND_MAPPINGS), help="study: as declared there.")
    add(
        "--normalisation",
        default="pretraining",
        choices=["pretraining", "dataset"],
        help="pretraining: x 10000, TerraMind v1 S2L2A mean/std; dataset: all chips' mean/std (study).",
    )
    add = parser.add_argument_group("model").add_argument
    add("--checkpoint", default=None, help="TerraMind_v1_<variant>.pt or .safetensors (a local file).")
    add("--variant", default="base", choices=list(VARIANT_NAMES), help="TerraMind v1 size (study: base).")
    add(
        "--layer", type=int, default=11, help="Encoder layer whose tokens are kept (study: SelectIndices 11)."
    )
    add("--save_mean", action="store_true", help="Also write the mean over tokens, (N, D), as mean.npy.")
    add("--batch_size", type=int, default=8, help="Chips per forward pass (memory, not results).")
    cli.add_shard_arguments(parser, "chips")
    demo = parser.add_argument_group("demo")
    cli.add_demo_argument(demo, "with a random TerraMind-shaped checkpoint, then the probe grid.")
    demo.add_argument("--demo_scale", type=float, default=0.12, help="Demo chips per class = study x this.")
    demo.add_argument("--demo_epochs", type=int, default=30, help="Epochs of the demo's probe grid.")
    cli.add_run_arguments(parser)
    precision.add_argument(parser)
    parser.demo_defaults(variant="tiny", save_mean=True)
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
from keras import layers, ops

from common import atomic, parallel, pipelines, runs
from common.errors import InputError, cli_entry, require, require_file
from common.lucas import demo_chips, lucas_chips

SCRIPT_STEM = "extract_terramind_embeddings"
REFLECTANCE_SCALE = 10000.0  # S2L2A digital numbers = reflectance x 10000, the pretraining data's units
SAVE_EVERY_SECONDS = 30.0  # flush the outputs and record progress at most this far apart
# The arguments that change the tokens; a resumed extraction must keep them.
RESUME_SETTINGS = (
    "data_root",
    "labels_csv",
    "variant",
    "layer",
    "band_mapping",
    "normalisation",
    "save_mean",
    "mixed_precision",
)
# Input paths, recorded relative to the run folder: a results tree moved with its chips still resumes.
INPUT_PATHS = ("data_root", "labels_csv")

MODALITY = "untok_sen2l2a@224"
EMBEDDING_PREFIX = f"encoder_embeddings.{MODALITY}."
# terratorch terramind_register: the 12 patch-embedding inputs of PRETRAINED_BANDS["untok_sen2l2a@224"]
# in order, each with its v1_pretraining_mean and v1_pretraining_std (reflectance x 10000).
V1_S2L2A_STATISTICS = {
    "COASTAL_AEROSOL": (1390.458, 2106.761),
    "BLUE": (1503.317, 2141.107),
    "GREEN": (1718.197, 2038.973),
    "RED": (1853.91, 2134.138),
    "RED_EDGE_1": (2199.1, 2085.321),
    "RED_EDGE_2": (2779.975, 1889.926),
    "RED_EDGE_3": (2987.011, 1820.257),
    "NIR_BROAD": (3083.234, 1871.918),
    "NIR_NARROW": (3132.22, 1753.829),
    "WATER_VAPOR": (3162.988, 1797.379),
    "SWIR_1": (2424.884, 1434.261),
    "SWIR_2": (1857.648, 1334.311),
}
PRETRAINED_BANDS = list(V1_S2L2A_STATISTICS)
PATCH_SIZE = 16
PRETRAINING_IMAGE_SIZE = 224  # the position embedding's 14 x 14 grid


# ---- TerraMind v1 sizes and terratorch's parameter names ----


@dataclass(frozen=True)
class EncoderConfig:
    """One TerraMind v1 encoder size (terratorch terramind_register.terramind_v1_<variant>)."""

    dim: int
    depth: int
    num_heads: int
    bias: bool  # qkv, attention projection and MLP biases
    gated_mlp: bool  # SiLU-gated MLP (SwiGLU) instead of a GELU MLP
    mlp_ratio: float = 4.0

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.dim * self.mlp_ratio)
        # tm_utils.GatedMlp: 2/3 of the hidden width for the extra matmul.
        return int(2 * hidden / 3) if self.gated_mlp else hidden


VARIANTS = {
    "tiny": EncoderConfig(dim=192, depth=12, num_heads=3, bias=True, gated_mlp=False),
    "small": EncoderConfig(dim=384, depth=12, num_heads=6, bias=True, gated_mlp=False),
    "base": EncoderConfig(dim=768, depth=12, num_heads=12, bias=False, gated_mlp=True),
    "large": EncoderConfig(dim=1024, depth=24, num_heads=16, bias=False, gated_mlp=True),
}
assert tuple(VARIANTS) == VARIANT_NAMES


def encoder_parameter_shapes(config: EncoderConfig, image_size: int = PRETRAINING_IMAGE_SIZE) -> dict:
    """terratorch's state-dict names and shapes of the S2L2A encoder path (12 input bands).

    The position embedding and the LayerNorm biases are buffers (fixed sin-cos values, zeros: all
    TerraMind v1 norms are `LayerNorm(bias=False)`); they are in the list because a state dict holds them.
    """
    d, grid = config.dim, (image_size // PATCH_SIZE) ** 2
    shapes = {
        EMBEDDING_PREFIX + "proj.weight": (d, PATCH_SIZE * PATCH_SIZE * len(PRETRAINED_BANDS)),
        EMBEDDING_PREFIX + "mod_emb": (1, 1, d),
        EMBEDDING_PREFIX + "pos_emb": (1, grid, d),
        "encoder_norm.weight": (d,),
        "encoder_norm.bias": (d,),
    }
    linears = {"attn.qkv": (3 * d, d), "attn.proj": (d, d)}
    linears |= {"mlp.fc1": (config.mlp_hidden, d), "mlp.fc2": (d, config.mlp_hidden)}
    if config.gated_mlp:
        linears["mlp.fc3"] = (config.mlp_hidden, d)
    for block in range(config.depth):
        prefix = f"encoder.{block}."
        shapes |= {
            prefix + f"{norm}.{part}": (d,) for norm in ("norm1", "norm2") for part in ("weight", "bias")
        }
        for name, shape in linears.items():
            shapes[prefix + name + ".weight"] = shape
            if config.bias:
                shapes[prefix + name + ".bias"] = shape[:1]
    return shapes


def is_buffer(name: str) -> bool:
    """The fixed (non-learned) tensors: sin-cos position embedding and bias-free LayerNorms' zero bias."""
    return name == EMBEDDING_PREFIX + "pos_emb" or re.search(r"norm\d?\.bias$", name) is not None


def in_encoder_namespace(name: str) -> bool:
    """True for names that belong to the S2L2A encoder path (others: decoder, other modalities, ...)."""
    return name.startswith(("encoder.", "encoder_norm.", EMBEDDING_PREFIX))


# ---- checkpoint: read, check strictly, record ----


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """A flat state dict {name: float32 array} from a `.pt` (torch.load, weights_only) or `.safetensors`."""
    path = require_file(path, "a TerraMind checkpoint (.pt or .safetensors)")
    expected = "a TerraMind state dict (TerraMind_v1_<variant>.pt or .safetensors)"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise InputError(path, f"cannot be read as safetensors ({first_line(error)})", expected) from None
    else:
        import pickle

        import torch

        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
            raise InputError(path, f"cannot be read by torch.load ({first_line(error)})", expected) from None
    import torch

    is_state_dict = isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())
    require(is_state_dict and tensors, path, "is not a flat name -> tensor mapping", expected)
    return {name: tensor.detach().float().numpy() for name, tensor in tensors.items()}


def first_line(error: BaseException) -> str:
    """The first line of an exception message, at most 120 characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:120]


def guess_variant(state: dict) -> str | None:
    """The variant whose learned encoder tensors the checkpoint holds exactly (names and shapes), or None."""
    encoder = {
        name: value for name, value in state.items() if in_encoder_namespace(name) and not is_buffer(name)
    }
    for variant, config in VARIANTS.items():
        shapes = {
            name: shape for name, shape in encoder_parameter_shapes(config).items() if not is_buffer(name)
        }
        if set(encoder) == set(shapes) and all(
            encoder[name].shape == shape for name, shape in shapes.items()
        ):
            return variant
    return None


def _listed(names, limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict(state: dict, variant: str, path) -> dict[str, np.ndarray]:
    """The encoder tensors of `state`, refusing any mismatch with TerraMind v1 `variant` in one line.

    Every learned tensor of the variant's S2L2A encoder must be present with its shape and no other
    name may sit in the encoder's namespace (a deeper encoder, another block type). Buffers may be
    absent (recomputed; the position embedding may be of another grid). Names outside the encoder
    (decoder, other modalities' embeddings, tokenizers) are ignored: the official files hold the
    whole encoder-decoder.
    """
    config = VARIANTS[variant]
    shapes = encoder_parameter_shapes(config)
    encoder = {name: value for name, value in state.items() if in_encoder_namespace(name)}
    if not encoder:
        problem = f"holds no TerraMind encoder tensors (names such as {_listed(state, 2)})"
        raise InputError(
            path, problem, f"{EMBEDDING_PREFIX}proj.weight, encoder.<i>.* as terratorch saves them"
        )
    missing = [name for name in shapes if name not in encoder and not is_buffer(name)]
    unexpected = [name for name in encoder if name not in shapes]
    wrong_shape = [
        f"{name} {tuple(encoder[name].shape)} (expected {shapes[name]})"
        for name in shapes
        if name in encoder and encoder[name].shape != shapes[name] and name != EMBEDDING_PREFIX + "pos_emb"
    ]
    position = encoder.get(EMBEDDING_PREFIX + "pos_emb")
    if position is not None and (position.ndim != 3 or position.shape[2] != config.dim):
        wrong_shape.append(
            f"{EMBEDDING_PREFIX}pos_emb {tuple(position.shape)} (expected (1, N, {config.dim}))"
        )
    if missing or unexpected or wrong_shape:
        parts = [f"{len(missing)} missing ({_listed(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_listed(unexpected)})"] if unexpected else []
        parts += [f"{len(wrong_shape)} of another shape ({_listed(wrong_shape, 2)})"] if wrong_shape else []
        guess = guess_variant(state)
        hint = f"; it holds TerraMind v1 {guess}: use --variant {guess}" if guess else ""
        problem = f"does not hold the TerraMind v1 {variant} encoder: " + ", ".join(parts) + hint
        raise InputError(path, problem, f"TerraMind_v1_{variant}.pt or .safetensors")
    return encoder


def read_encoder_tensors(path, variant: str) -> tuple[dict, dict]:
    """Read a checkpoint and keep its checked encoder tensors (`check_state_dict`).

    Returns:
        The encoder tensors and a record: checkpoint path, tensors used, tensors outside the encoder.
    """
    state = read_checkpoint(path)
    tensors = check_state_dict(state, variant, path)
    record = {"checkpoint": str(Path(path)), "variant": variant, "encoder_tensors": len(tensors)}
    return tensors, record | {"ignored_tensors": len(state) - len(tensors)}


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (recorded, and compared on --resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_random_checkpoint(path, variant, seed=0):
    """A randomly initialised TerraMind v1 `variant` encoder under terratorch's names, as .safetensors.

    Shapes are the real ones (12 pretrained bands, 14 x 14 position grid); linear weights Xavier
    uniform, norms at 1 with zero bias buffers, the modality embedding N(0, 0.02) as terratorch's
    init, the sin-cos position embedding exact. For demos and tests: no pretrained knowledge.
    """
    from safetensors.numpy import save_file

    config, rng = VARIANTS[variant], np.random.default_rng(seed)
    tensors = {}
    for name, shape in encoder_parameter_shapes(config).items():
        if name.endswith("pos_emb"):
            value = sincos_position_embedding(round(shape[1] ** 0.5), config.dim)
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
            value = np.ones(shape)
        elif name.endswith("mod_emb"):
            value = rng.normal(0.0, 0.02, shape)
        elif len(shape) == 2:
            limit = np.sqrt(6.0 / sum(shape))
            value = rng.uniform(-limit, limit, shape)
        else:
            value = np.zeros(shape)
        tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
    with atomic.atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"variant": variant, "random_seed": str(seed)})
    return Path(path)


# ---- inputs of the encoder: bands and position grid ----


def select_patch_bands(proj_weight: np.ndarray, bands) -> np.ndarray:
    """Patch-embedding columns of `bands` of the 12 pretrained ones: `(D, 256 x 12)` -> `(D, 256 x bands)`.

    terratorch's select_modality_patch_embed_weights: the flattened patch is pixel-major and
    band-minor, so the weight is viewed as `[D, pixel, band]` and the named bands' columns are kept.
    """
    unknown = [band for band in bands if band not in PRETRAINED_BANDS]
    if unknown:
        raise ValueError(f"unknown S2L2A band(s) {unknown}; known: {PRETRAINED_BANDS}")
    dim = proj_weight.shape[0]
    per_pixel = proj_weight.reshape(dim, PATCH_SIZE * PATCH_SIZE, len(PRETRAINED_BANDS))
    picked = per_pixel[:, :, [PRETRAINED_BANDS.index(band) for band in bands]]
    return picked.reshape(dim, -1)


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """tm_utils.build_2d_sincos_posemb for a square grid: `(1, grid * grid, dim)` float32."""
    first, second = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float32) / (dim // 4))
    out_first = first.reshape(-1, 1) * omega
    out_second = second.reshape(-1, 1) * omega
    parts = [np.sin(out_first), np.cos(out_first), np.sin(out_second), np.cos(out_second)]
    return np.concatenate(parts, axis=1)[None].astype(np.float32)


def bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """`(size_out, size_in)` weights of torch's `interpolate(mode="bicubic", align_corners=False)` per axis.

    Keys cubic convolution with a = -0.75, source index scale * (i + 0.5) - 0.5, border indices
    clamped (test_bicubic_matrix_equals_torch_interpolate).
    """
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        real = size_in / size_out * (i + 0.5) - 0.5
        base = np.floor(real)
        t = real - base
        weights = [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ]
        for offset, weight in enumerate(weights):
            matrix[i, int(min(max(base - 1 + offset, 0), size_in - 1))] += weight
    return matrix


def position_embedding_for(pos_emb: np.ndarray, image_size: int) -> np.ndarray:
    """The `(1, N, D)` position embedding resized to `image_size` as tm_utils.interpolate_pos_encoding."""
    side = round(pos_emb.shape[1] ** 0.5)
    grid = image_size // PATCH_SIZE
    if grid == side:
        return pos_emb.astype(np.float32)
    matrix = bicubic_matrix(side, grid)
    square = pos_emb.reshape(side, side, -1).astype(np.float64)
    resized = np.einsum("ai,bj,ijd->abd", matrix, matrix, square)
    return resized.reshape(1, grid * grid, -1).astype(np.float32)


# ---- the Keras encoder ----


@keras.saving.register_keras_serializable(package="rsrepro")
class PatchEmbedding(layers.Layer):
    """ImageEncoderEmbedding: `(B, H, W, C)` -> `(B, H/16 * W/16, D)` projected patches + position + modality.

    Patches are flattened as terratorch's rearrange 'b d (nh ph) (nw pw) -> b (nh nw) (ph pw d)':
    row-major over the patch grid, each patch pixel-major and band-minor.
    """

    def __init__(self, dim, num_tokens, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_tokens = int(dim), int(num_tokens)

    def build(self, input_shape):
        inputs = PATCH_SIZE * PATCH_SIZE * int(input_shape[-1])
        self.projection = self.add_weight(shape=(inputs, self.dim), name="projection", trainable=False)
        shape = (1, self.num_tokens, self.dim)
        self.position = self.add_weight(shape=shape, name="position", initializer="zeros", trainable=False)
        self.modality = self.add_weight(
            shape=(1, 1, self.dim), name="modality", initializer="zeros", trainable=False
        )

    def call(self, chips):
        batch, height, width, channels = ops.shape(chips)
        rows, columns = height // PATCH_SIZE, width // PATCH_SIZE
        x = ops.reshape(chips, (batch, rows, PATCH_SIZE, columns, PATCH_SIZE, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        x = ops.reshape(x, (batch, rows * columns, PATCH_SIZE * PATCH_SIZE * channels))
        return ops.matmul(x, self.projection) + self.position + self.modality

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_tokens": self.num_tokens}


@keras.saving.register_keras_serializable(package="rsrepro")
class TransformerBlock(layers.Layer):
    """tm_utils.Block: x + Attention(LN(x)), then x + Mlp(LN(x)); GELU MLP or SiLU-gated MLP."""

    def __init__(self, dim, num_heads, mlp_hidden, bias, gated_mlp, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.mlp_hidden = int(dim), int(num_heads), int(mlp_hidden)
        self.bias, self.gated_mlp = bool(bias), bool(gated_mlp)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.qkv = layers.Dense(3 * dim, use_bias=bias, name="qkv")
        self.proj = layers.Dense(dim, use_bias=bias, name="proj")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.fc1 = layers.Dense(mlp_hidden, use_bias=bias, name="fc1")
        self.fc2 = layers.Dense(dim, use_bias=bias, name="fc2")
        self.fc3 = layers.Dense(mlp_hidden, use_bias=bias, name="fc3") if gated_mlp else None

    def attention(self, x):
        batch, tokens = ops.shape(x)[0], ops.shape(x)[1]
        head_dim = self.dim // self.num_heads
        qkv = ops.reshape(self.qkv(x), (batch, tokens, 3, self.num_heads, head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))) * head_dim**-0.5
        mixed = ops.matmul(ops.softmax(scores, axis=-1), value)
        return self.proj(ops.reshape(ops.transpose(mixed, (0, 2, 1, 3)), (batch, tokens, self.dim)))

    def mlp(self, x):
        if self.gated_mlp:
            return self.fc2(ops.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(ops.gelu(self.fc1(x), approximate=False))

    def call(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def get_config(self):
        config = {"dim": self.dim, "num_heads": self.num_heads, "mlp_hidden": self.mlp_hidden}
        return {**super().get_config(), **config, "bias": self.bias, "gated_mlp": self.gated_mlp}


def build_encoder(config: EncoderConfig, image_size: int, bands: int, layer_index: int) -> keras.Model:
    """`(B, image_size, image_size, bands)` standardised chips -> tokens `(B, (image_size/16)^2, D)`.

    The tokens are the output of block `layer_index` (0-based, terratorch's SelectIndices); the last
    block's output goes through `encoder_norm` as in TerraMindViT.forward. Blocks after
    `layer_index` are not built.
    """
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size {image_size} is not a multiple of the {PATCH_SIZE} px patch")
    if not 0 <= layer_index < config.depth:
        raise ValueError(f"layer_index {layer_index} outside 0..{config.depth - 1}")
    chips = keras.Input((image_size, image_size, bands), name="chips")
    x = PatchEmbedding(config.dim, (image_size // PATCH_SIZE) ** 2, name="patch_embedding")(chips)
    for index in range(layer_index + 1):
        block = TransformerBlock(
            config.dim,
            config.num_heads,
            config.mlp_hidden,
            config.bias,
            config.gated_mlp,
            name=f"encoder_{index}",
        )
        x = block(x)
    if layer_index == config.depth - 1:
        x = layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(x)
    # float32 tokens under --mixed_precision as well (a no-op in float32).
    return keras.Model(chips, ops.cast(x, "float32"), name="terramind_encoder")


def _dense(layer, tensors: dict, name: str) -> None:
    # torch Linear keeps (out, in); a Keras Dense kernel is (in, out).
    values = [tensors[f"{name}.weight"].T]
    if layer.use_bias:
        values.append(tensors[f"{name}.bias"])
    layer.set_weights(values)


def _norm(layer, tensors: dict, name: str) -> None:
    weight = tensors[f"{name}.weight"]
    layer.set_weights([weight, tensors.get(f"{name}.bias", np.zeros_like(weight))])


def assign_weights(model: keras.Model, tensors: dict, bands, image_size: int) -> None:
    """Copy terratorch-named `tensors` (after `check_state_dict`) into a `build_encoder` model.

    The patch projection keeps the columns of `bands` (names from PRETRAINED_BANDS, one per input
    channel in channel order); the position embedding is the checkpoint's (or the sin-cos values it
    holds by construction), resized to `image_size` like terratorch does.
    """
    embedding = model.get_layer("patch_embedding")
    dim = embedding.dim
    projection = select_patch_bands(tensors[EMBEDDING_PREFIX + "proj.weight"], bands).T
    pos_emb = tensors.get(EMBEDDING_PREFIX + "pos_emb")
    if pos_emb is None:
        pos_emb = sincos_position_embedding(PRETRAINING_IMAGE_SIZE // PATCH_SIZE, dim)
    position = position_embedding_for(pos_emb, image_size)
    embedding.set_weights([projection, position, tensors[EMBEDDING_PREFIX + "mod_emb"]])
    for layer in model.layers:
        if isinstance(layer, TransformerBlock):
            prefix = "encoder." + layer.name.split("_")[-1]
            _norm(layer.norm1, tensors, f"{prefix}.norm1")
            _norm(layer.norm2, tensors, f"{prefix}.norm2")
            _dense(layer.qkv, tensors, f"{prefix}.attn.qkv")
            _dense(layer.proj, tensors, f"{prefix}.attn.proj")
            for name in ("fc1", "fc2", "fc3"):
                if getattr(layer, name) is not None:
                    _dense(getattr(layer, name), tensors, f"{prefix}.mlp.{name}")
        elif layer.name == "encoder_norm":
            _norm(layer, tensors, "encoder_norm")


# ---- the chips: bands and standardisation ----


def band_preprocessing(band_mapping, normalisation, chip_mean=None, chip_std=None):
    """Pretrained band names per chip channel, and the scale, mean and std that standardise the chips.

    Returns:
        (bands, scale, mean, std): chips are standardised as (chips x scale - mean) / std per band.
    """
    bands = BAND_MAPPINGS[band_mapping]
    if normalisation == "dataset":
        return bands, 1.0, np.asarray(chip_mean, np.float32), np.asarray(chip_std, np.float32)
    mean = np.array([V1_S2L2A_STATISTICS[band][0] for band in bands], np.float32)
    std = np.array([V1_S2L2A_STATISTICS[band][1] for band in bands], np.float32)
    return bands, REFLECTANCE_SCALE, mean, std


def standardise(chips, scale, mean, std):
    """`(B, H, W, 6)` reflectance -> standardised float32 encoder input."""
    return ((np.asarray(chips, np.float32) * np.float32(scale) - mean) / std).astype(np.float32)


def chip_statistics(reader, count, batch_size):
    """Per-band mean and (population) std over every pixel of every chip, as the study computed them."""
    with reader.surface():
        batches = reader.dataset(np.arange(count), None, max(32, batch_size)).as_numpy_iterator()
        mean, variance = pipelines.band_statistics(batches)
    return mean, np.sqrt(variance)


# ---- extraction ----


def prepare_encoder(args, tensors, loaded, reader, image_size):
    """Band mapping, standardisation and the encoder with the checkpoint's `tensors`; prints them.

    Returns:
        The encoder, the preprocessing of `band_preprocessing` and their record for extraction.json.
    """
    count = len(reader.paths)
    chip_mean, chip_std = chip_statistics(reader, count, args.batch_size)
    preprocessing = band_preprocessing(args.band_mapping, args.normalisation, chip_mean, chip_std)
    bands, scale, mean, std = preprocessing
    precision.apply(args.mixed_precision)
    encoder = build_encoder(VARIANTS[args.variant], image_size, len(bands), args.layer)
    assign_weights(encoder, tensors, bands, image_size)
    shape = (count, *encoder.output.shape[1:])
    grid = image_size // PATCH_SIZE
    print(f"chips: {count} of {image_size} px -> {grid} x {grid} tokens of {shape[2]} (layer {args.layer})")
    print("bands: " + ", ".join(f"{b} -> {w}" for b, w in zip(lucas_chips.BAND_NAMES, bands, strict=True)))
    rounded = [np.round(values.astype(np.float64), 3).tolist() for values in (mean, std)]
    print(f"standardisation: x {scale:g}, mean {rounded[0]}, std {rounded[1]}")
    print(
        f"checkpoint: {loaded['encoder_tensors']} encoder tensors, {loaded['ignored_tensors']} others unused"
    )
    print(f"output: {np.prod(shape) * 4 / 2**30:.3f} GiB of float32 tokens")
    record = {
        "checkpoint": loaded,
        "bands": dict(zip(lucas_chips.BAND_NAMES, bands, strict=True)),
        "scale": scale,
    }
    record |= {"mean": mean, "std": std, "chip_mean": chip_mean, "chip_std": chip_std}
    return encoder, preprocessing, record | {"shape": shape, "layer": args.layer}


def embed_batch(encoder, chips, preprocessing, batch_size):
    """Tokens `(B, T, D)` of one batch of raw chips (a short last batch is padded: one traced shape)."""
    _, scale, mean, std = preprocessing
    inputs = standardise(chips, scale, mean, std)
    count = len(inputs)
    if count < batch_size:
        inputs = np.concatenate([inputs, np.zeros((batch_size - count, *inputs.shape[1:]), np.float32)])
    return np.asarray(encoder.predict_on_batch(inputs), dtype=np.float32)[:count]


def open_outputs(run_dir, shape, save_mean, fresh):
    """The memory-mapped `.partial.npy` outputs: created when `fresh`, else reopened to continue."""
    outputs = {"tokens": shape} | ({"mean": (shape[0], shape[2])} if save_mean else {})
    arrays = {}
    for name, expected in outputs.items():
        path = run_dir / f"{name}.partial.npy"
        if fresh:
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=expected)
            continue
        try:
            arrays[name] = np.lib.format.open_memmap(path, mode="r+")
        except (OSError, ValueError) as error:
            raise InputError(
                path, f"cannot be reopened ({error})", "the partial output of this run"
            ) from None
        problem = f"has shape {arrays[name].shape}"
        require(arrays[name].shape == expected, path, problem, f"{expected} (--overwrite to start over)")
    return arrays


def extract(encoder, reader, preprocessing, arrays, first, batch_size, progress, chips_in_order):
    """Stream tokens of `chips_in_order[first:]` (indices into the reader's chips) into the memory maps
    from row `first` on; `progress(rows)` after each flush.

    A flush plus progress record at most SAVE_EVERY_SECONDS apart: an interrupted run loses at most
    that much work, and every row the record counts is on disk. Returns (chips, seconds) of this call.
    """
    count = arrays["tokens"].shape[0]
    start_time, last_save, row = time.monotonic(), time.monotonic(), first
    with reader.surface():
        for chips in reader.dataset(chips_in_order[first:], None, batch_size).as_numpy_iterator():
            tokens = embed_batch(encoder, chips, preprocessing, batch_size)
            arrays["tokens"][row : row + len(tokens)] = tokens
            if "mean" in arrays:
                arrays["mean"][row : row + len(tokens)] = tokens.mean(axis=1)
            row += len(tokens)
            if time.monotonic() - last_save >= SAVE_EVERY_SECONDS or row == count:
                for array in arrays.values():
                    array.flush()
                progress(row)
                last_save = time.monotonic()
                print(f"  {row}/{count} chips")
    return row - first, time.monotonic() - start_time


def run_folder(args):
    """Where this extraction's run folder is (or will be)."""
    name = args.run_name or f"terramind_v1_{args.variant}_{args.band_mapping}_{args.normalisation}"
    return Path(args.results_dir) / SCRIPT_STEM / name


def prepare_extraction(args, settings):
    """The run folder and the chips already done: all (finished run, --resume), some (interrupted), 0."""
    name = run_folder(args).name
    if args.shard:  # shard K of N: its own run folder <run_name>.shards/K_of_N
        name = parallel.shard_path(name, parallel.parse_shard(args.shard))
    marker = "extraction.json"
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, name, args.overwrite, args.resume, marker)
    if (run_dir / marker).is_file():
        runs.check_same_settings(
            run_dir / marker, settings, what="the tokens in this run folder", section="settings"
        )
        print(f"finished earlier with the same settings, kept: {run_dir / 'tokens.npy'}")
        return run_dir, settings["chips"]
    progress_path = run_dir / "progress.json"
    if not progress_path.is_file():
        return run_dir, 0
    require(
        args.resume,
        run_dir,
        "holds an interrupted extraction",
        "--resume to continue it, --overwrite to start over, or another --run_name",
    )
    runs.check_same_settings(
        progress_path, settings, what="the tokens in this run folder", section="settings"
    )
    rows = int(json.loads(progress_path.read_text())["rows"])
    print(f"resuming after {rows} chips")
    return run_dir, rows


def write_outputs(run_dir, encoder, reader, preprocessing, first, args, record, chips_in_order):
    """Extract (or continue) the tokens of `chips_in_order` (all chips, or a shard's), rename the
    finished `.partial.npy` files, write extraction.json last."""
    shape = record["shape"] = (len(chips_in_order), *record["shape"][1:])
    arrays = open_outputs(run_dir, shape, args.save_mean, fresh=first == 0)

    def progress(rows):
        atomic.write_json(run_dir / "progress.json", {"settings": record["settings"], "rows": rows})

    if first == 0:
        progress(0)
    chips_done, seconds = extract(
        encoder, reader, preprocessing, arrays, first, args.batch_size, progress, chips_in_order
    )
    del arrays  # closes the memory maps before their files are renamed
    for name in ("tokens", "mean")[: 1 + args.save_mean]:
        os.replace(run_dir / f"{name}.partial.npy", run_dir / f"{name}.npy")
    speed = chips_done / max(seconds, 1e-9)
    record |= {"chips_extracted": chips_done, "seconds": seconds, "chips_per_second": speed}
    atomic.write_json(run_dir / "extraction.json", runs.run_record(args) | record)
    (run_dir / "progress.json").unlink()
    where = run_dir / "tokens.npy"
    print(f"tokens {shape} -> {where}; {chips_done} chips in {seconds:.1f} s ({speed:.2f} chips/s)")


def merge_shards(args):
    """--merge: the tokens (and means) of the finished `--shard K/N` run folders, each row put back where
    one process writes it, into the run folder that process writes (extraction.json last)."""
    marker = "extraction.json"
    parts = parallel.shard_parts(run_folder(args), "", lambda part: (part / marker).is_file())
    records = [json.loads((part / marker).read_text()) for part in parts]
    settings = {key: value for key, value in records[0]["settings"].items() if key != "shard"}
    batch_size = dict(records[0]["settings"].get("shard") or {}).get("batch_size")
    shape = (settings["chips"], *records[0]["shape"][1:])
    for index, (part, record) in enumerate(zip(parts, records, strict=True), start=1):
        require(
            record["settings"]
            == settings | {"shard": {"part": f"{index}/{len(parts)}", "batch_size": batch_size}},
            part / marker,
            "was made with other settings than shard 1",
            "parts of one command line that differs only in --shard",
        )
        rows = len(parallel.shard_rows(shape[0], batch_size, (index, len(parts))))
        for output in ("tokens", "mean")[: 1 + settings["save_mean"]]:
            found = np.load(part / f"{output}.npy", mmap_mode="r").shape
            expected = (rows, *shape[1:]) if output == "tokens" else (rows, shape[2])
            require(found == expected, part / f"{output}.npy", f"has shape {found}", f"{expected}")
    name = run_folder(args).name
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, name, args.overwrite, args.resume, marker)
    arrays = open_outputs(run_dir, shape, settings["save_mean"], fresh=True)
    for index, part in enumerate(parts, start=1):
        for output, array in arrays.items():
            part_rows, start = np.load(part / f"{output}.npy", mmap_mode="r"), 0
            for batch in parallel.shard_batches(shape[0], batch_size, (index, len(parts))):
                # Batch by batch from the part's memory map: memory stays bounded by one batch.
                array[batch.start : batch.stop] = part_rows[start : start + len(batch)]
                start += len(batch)
            array.flush()
    del arrays  # closes the memory maps before their files are renamed
    for output in ("tokens", "mean")[: 1 + settings["save_mean"]]:
        os.replace(run_dir / f"{output}.partial.npy", run_dir / f"{output}.npy")
    chips_done, seconds = (sum(record[key] for record in records) for key in ("chips_extracted", "seconds"))
    record = records[0] | runs.run_record(args) | {"settings": settings, "shape": shape, "shards": len(parts)}
    speed = chips_done / max(seconds, 1e-9)  # the parts' chips over the parts' seconds
    record |= {"chips_extracted": chips_done, "seconds": seconds, "chips_per_second": speed}
    atomic.write_json(run_dir / marker, record)
    print(f"tokens {shape} -> {run_dir / 'tokens.npy'}; merged from {len(parts)} shards")
    return run_dir


# ---- demo ----


def prepare_demo(args):
    """Demo chips (the LUCAS demo generator) and a random TerraMind-shaped checkpoint, written once."""
    folder = cli.demo_data_dir(args, SCRIPT_STEM)
    args.data_root = str(demo_chips.write_demo_chips(folder / "chips", args.demo_scale))
    checkpoint = folder / f"TerraMind_v1_{args.variant}_random.safetensors"
    if not checkpoint.is_file():
        write_random_checkpoint(checkpoint, args.variant, args.seed)
    args.checkpoint = str(checkpoint)


def run_probe_demo(args, labels_csv, tokens_path):
    """The demo's last step: train_lucas_classifier.py --embeddings <tokens> --grid on the demo chips."""
    import train_lucas_classifier

    argv = ["--labels_csv", labels_csv, "--embeddings", tokens_path, "--grid", "--epochs", args.demo_epochs]
    argv += ["--learning_rate", "1e-3", "--results_dir", args.results_dir, "--run_name", "terramind_demo"]
    argv += ["--overwrite"] if args.overwrite else []
    print("probe: train_lucas_classifier.py " + " ".join(map(str, argv)))
    train_lucas_classifier.main(train_lucas_classifier.get_args_parser().parse_args(list(map(str, argv))))


@cli_entry
def main(args):
    depth = VARIANTS[args.variant].depth
    require(0 <= args.layer < depth, "--layer", f"{args.layer}", f"0..{depth - 1} for v1 {args.variant}")
    require(1 <= args.batch_size <= 2**16, "--batch_size", f"{args.batch_size}", "an integer from 1 to 65536")
    require(0 <= args.seed < 2**32, "--seed", f"{args.seed}", "0 .. 2^32 - 1")
    require(0 < args.demo_scale <= 10, "--demo_scale", f"{args.demo_scale}", "in (0, 10]")
    require(
        1 <= args.demo_epochs <= 10**6, "--demo_epochs", f"{args.demo_epochs}", "an integer from 1 to 10^6"
    )
    shard = parallel.shard_of(args)
    runs.seed_everything(args.seed, args.deterministic)
    if args.demo:
        prepare_demo(args)
    runs.print_args(args)
    require(args.data_root, "--data_root", "no chips given", "--data_root <chips folder>, or --demo")
    require(args.checkpoint, "--checkpoint", "no checkpoint given", "a local TerraMind_v1_<variant>.pt")

    # ---- data ----
    labels_csv = Path(args.labels_csv or Path(args.data_root) / lucas_chips.LABELS_CSV_NAME)
    if args.merge:  # the finished --shard parts joined into the run folder one process writes
        run_dir = merge_shards(args)
        if args.demo:
            run_probe_demo(args, labels_csv, run_dir / "tokens.npy")
        return run_dir
    point_ids, labels = lucas_chips.read_labels(labels_csv)
    paths, sizes = lucas_chips.locate_chips(args.data_root, labels_csv, point_ids, labels)
    image_size = lucas_chips.chip_size(sizes, None, args.data_root)
    problem = f"has {image_size} px chips"
    require(image_size % PATCH_SIZE == 0, args.data_root, problem, "chips of a multiple of 16 px")
    reader = lucas_chips.ChipReader(paths)
    checkpoint = require_file(args.checkpoint, "a TerraMind checkpoint (.pt or .safetensors)")
    settings = runs.settings_of(args, RESUME_SETTINGS, run_folder(args), INPUT_PATHS)
    settings |= {"chips": len(paths), "image_size": image_size, "checkpoint_sha256": file_sha256(checkpoint)}
    chips_in_order = np.arange(len(paths))
    if shard:  # every N-th batch from the K-th; the batch size deals the chips, so it is recorded
        chips_in_order = np.array(parallel.shard_rows(len(paths), args.batch_size, shard))
        settings["shard"] = {"part": f"{shard[0]}/{shard[1]}", "batch_size": args.batch_size}
    # The checkpoint and every chip are read before the run folder is made: a bad file leaves nothing.
    tensors, loaded = read_encoder_tensors(checkpoint, args.variant)
    reader.check_readable(np.arange(len(paths)), args.batch_size)
    run_dir, first = prepare_extraction(args, settings)

    # ---- model ----
    if first < len(chips_in_order):
        encoder, preprocessing, record = prepare_encoder(args, tensors, loaded, reader, image_size)
        record |= {"settings": settings, "labels_csv_order": str(labels_csv)}

        # ---- extract ----
        write_outputs(run_dir, encoder, reader, preprocessing, first, args, record, chips_in_order)
    if args.demo and not shard:
        run_probe_demo(args, labels_csv, run_dir / "tokens.npy")
    return run_dir


if __name__ == "__main__":
    main(get_args_parser().parse_args())
