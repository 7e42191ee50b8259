"""TerraMind v1 encoder for raw Sentinel-2 L2A input in Keras 3, loaded from the official checkpoint.

TerraMind (IBM / ESA, arXiv 2504.11171) is a multimodal ViT; terratorch's `TerraMindViT` with the
raw `S2L2A` modality is the model the LUCAS study probed. This module ports that encoder path:
`ImageEncoderEmbedding` (16 px patches flattened pixel-major, band-minor, a bias-free linear
projection, fixed 2-D sin-cos position embedding, learned modality embedding), pre-norm transformer
blocks (GELU MLP with biases for v1 tiny/small, bias-free SiLU-gated MLP for v1 base/large), and the
final `encoder_norm`, which terratorch applies to the last layer's output only. Parameter names are
terratorch's (`encoder.3.attn.qkv.weight`, `encoder_embeddings.untok_sen2l2a@224.proj.weight`), so
the official `TerraMind_v1_<variant>.pt` or `.safetensors` loads by name. Unlike terratorch's
`ckpt_path` load (strict=False), a checkpoint that does not hold exactly the chosen variant's encoder
is refused with one line. tests/fixtures/make_terramind_fixture.py makes the reference tokens that
test_keras_encoder_equals_the_reference_fixture compares against.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from common.errors import InputError, require, require_file

MODALITY = "untok_sen2l2a@224"
EMBEDDING_PREFIX = f"encoder_embeddings.{MODALITY}."
# terratorch terramind_register.PRETRAINED_BANDS["untok_sen2l2a@224"]: the 12 patch-embedding inputs.
PRETRAINED_BANDS = [
    *("COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3"),
    *("NIR_BROAD", "NIR_NARROW", "WATER_VAPOR", "SWIR_1", "SWIR_2"),
]
# terratorch terramind_register.v1_pretraining_mean / _std["untok_sen2l2a@224"] (reflectance x 10000).
V1_S2L2A_MEAN = [
    *(1390.458, 1503.317, 1718.197, 1853.91, 2199.1, 2779.975),
    *(2987.011, 3083.234, 3132.22, 3162.988, 2424.884, 1857.648),
]
V1_S2L2A_STD = [
    *(2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926),
    *(1820.257, 1871.918, 1753.829, 1797.379, 1434.261, 1334.311),
]
PATCH_SIZE = 16
PRETRAINING_IMAGE_SIZE = 224  # the position embedding's 14 x 14 grid


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


# ---- checkpoint: names, shapes, strict check ----


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


# ---- inputs: bands and position grid ----


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
    return keras.Model(chips, x, name="terramind_encoder")


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


def read_encoder_tensors(path, variant: str) -> tuple[dict, dict]:
    """Read a checkpoint and keep its checked encoder tensors (`check_state_dict`).

    Returns:
        The encoder tensors and a record: checkpoint path, tensors used, tensors outside the encoder.
    """
    state = read_checkpoint(path)
    tensors = check_state_dict(state, variant, path)
    record = {"checkpoint": str(Path(path)), "variant": variant, "encoder_tensors": len(tensors)}
    return tensors, record | {"ignored_tensors": len(state) - len(tensors)}


def load_encoder(path, variant: str, bands, image_size: int, layer_index: int) -> tuple[keras.Model, dict]:
    """Read, check and load a TerraMind v1 checkpoint into a Keras encoder for `bands`-channel chips.

    Returns:
        The encoder (`build_encoder`, weights assigned) and the record of `read_encoder_tensors`.
    """
    tensors, record = read_encoder_tensors(path, variant)
    model = build_encoder(VARIANTS[variant], image_size, len(bands), layer_index)
    assign_weights(model, tensors, bands, image_size)
    return model, record
