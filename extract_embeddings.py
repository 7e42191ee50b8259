"""Foundation-model image embeddings (CLIP, DINOv2, MAE) for the TG-MATL scripts.

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837. The paper's projection and task heads
(`igarss_exp1.py`, `igarss_exp2.py`) start from precomputed embeddings of the AWIR images:
`embeddings/awir_clip_emb.npy` (N, 512), `awir_dinov2_emb.npy` (N, 768) and `awir_mae_emb.npy`
(N, 768). This script computes them from the images in `data.npz` with Hugging Face transformers
(PyTorch backend):

- clip   (openai/clip-vit-base-patch32): the vision tower's pooled output through CLIP's visual
         projection, i.e. `CLIPModel.get_image_features` (512-d, not L2-normalised).
- dinov2 (facebook/dinov2-base): the CLS token after the final layer norm (768-d), the image
         representation DINOv2 uses for linear probing.
- mae    (facebook/vit-mae-base): the encoder's CLS token after the final layer norm with masking
         disabled (mask_ratio 0, patches kept in their natural order), so every patch is seen (768-d).

Each model's own image processor (resize, centre crop, normalisation; PIL backend) prepares the
images; single-channel thermal images are replicated to three channels as PIL's RGB conversion does.

Commands (a local model folder from `save_pretrained` or `hf download <id> --local-dir <folder>`,
or a hub id when the machine has network):

    python extract_embeddings.py --data data.npz --model clip --model_path ./clip-vit-base-patch32
    python extract_embeddings.py --data data.npz --model dinov2 --model_path ./dinov2-base
    python extract_embeddings.py --data data.npz --model mae --model_path ./vit-mae-base
    python extract_embeddings.py --demo

Runtime: for the 240 AWIR images the ViT-B models take about 50 s (CLIP), 170 s (DINOv2) and
130 s (MAE) of CPU time, measured on a 2-core machine (--device cuda for a GPU). The demo builds three
tiny randomly initialised models at the real output widths and a 240-image synthetic `data.npz`,
and takes about 15 s of CPU time. It ends with:

demo: clip (240, 512), dinov2 (240, 768), mae (240, 768) -> results/demo_data/extract_embeddings/embeddings
"""

import argparse
import itertools
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from common import cli, precision, progress

FOUNDATION_MODEL_NAMES = ("clip", "dinov2", "mae")


def get_args_parser():
    parser = cli.Parser(
        description="Compute CLIP / DINOv2 / MAE image embeddings of data.npz for the TG-MATL scripts."
    )
    parser.add_argument(
        "--data",
        default="data.npz",
        help="data.npz holding the images (rgb (N,H,W,3) and/or thermal (N,H,W,1)) and "
        "class_label (N,); read one batch at a time.",
    )
    parser.add_argument(
        "--model",
        choices=sorted(FOUNDATION_MODEL_NAMES),
        default="clip",
        help="Foundation model: clip (512-d projected image embedding), dinov2 (768-d CLS), "
        "mae (768-d encoder CLS, no masking).",
    )
    parser.add_argument(
        "--model_path",
        default=None,
        help="Local Hugging Face model folder (config.json, weights, "
        "preprocessor_config.json), or a hub id when the machine has network. "
        "Default: the paper's checkpoint id (openai/clip-vit-base-patch32, "
        "facebook/dinov2-base, facebook/vit-mae-base).",
    )
    parser.add_argument(
        "--embeddings_dir",
        default="embeddings",
        help="Where awir_<model>_emb.npy is written (with --demo and not typed: "
        "<results_dir>/demo_data/extract_embeddings/embeddings).",
    )
    parser.add_argument(
        "--input",
        choices=["rgb", "thermal"],
        default="rgb",
        help="Which image array of data.npz to embed; thermal is replicated to 3 channels.",
    )
    parser.add_argument(
        "--rescale",
        choices=["auto", "minmax"],
        default="auto",
        help="auto: uint8 as is, other values must lie in [0,1] (scaled by 255) or [0,255]; "
        "minmax: map the dataset's [min, max] to [0, 255] (for raw thermal values).",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:<index>."
    )
    precision.add_argument(parser)
    progress.add_argument(parser)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seeds Python, NumPy and PyTorch (the extraction itself is deterministic).",
    )
    parser.add_argument(
        "--checkpoint_every",
        type=int,
        default=1024,
        help="Save the embeddings done so far every this many images (rounded up to whole "
        "batches), so an interrupted run continues with --resume.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted extraction from its last checkpoint (same settings).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace existing embeddings (or partial ones) instead of stopping.",
    )
    cli.add_shard_arguments(parser, "images")
    parser.add_argument("--results_dir", default="results", help="Root of the output tree (used by --demo).")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="Build tiny random CLIP, DINOv2 and MAE models and a synthetic data.npz under "
        "<results_dir>/demo_data/extract_embeddings/, then extract all three.",
    )
    parser.add_argument("--demo_samples", type=int, default=240, help=argparse.SUPPRESS)
    return parser


# --help answers here, before torch loads.
cli.answer_help_early(get_args_parser, __name__)

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTImageProcessorPil,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

from common import atomic, parallel, runs
from common.errors import InputError, cli_entry, require, require_file
from common.tgmatl import awir

# Per model: the transformers class that computes the embedding, the hub id of the checkpoint the
# paper used, the model_type values a matching config.json may carry, and the embedding width of
# that checkpoint (other checkpoints of the same family may be wider or narrower).
FOUNDATION_MODELS = {
    "clip": (
        CLIPVisionModelWithProjection,
        "openai/clip-vit-base-patch32",
        ("clip", "clip_vision_model"),
        512,
    ),
    "dinov2": (Dinov2Model, "facebook/dinov2-base", ("dinov2",), 768),
    "mae": (ViTMAEModel, "facebook/vit-mae-base", ("vit_mae",), 768),
}
assert tuple(FOUNDATION_MODELS) == FOUNDATION_MODEL_NAMES
# The settings a resume must match: these arguments, plus what is derived from the others (the
# resolved data file and model folder, the image count, the pixel mapping, the model), so that rows
# embedded from another file, model or setting are never mixed into one output.
RESUME_SETTINGS = ("input", "batch_size", "mixed_precision")
# Upper bounds of the numeric flags (a slip is refused rather than run).
MAX_BATCH = 1 << 16
MAX_SEED = 2**32 - 1


def seed_torch(seed):
    """Seed PyTorch and turn on its deterministic kernels, so a re-run gives identical arrays.

    Only PyTorch draws random numbers here (the demo models' initialisation; the demo images come from
    their own `np.random.default_rng(seed)`). common.runs.seed_everything seeds Python, NumPy and
    Keras, and importing Keras would load TensorFlow (about 5 s and 700 MB) into a PyTorch script.
    """
    torch.manual_seed(seed)
    # cuBLAS needs a fixed workspace to be deterministic; TF32 would change the float32 results.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


# ---- reading images from data.npz one batch at a time ----
#
# `np.load` of an .npz is lazy per key but reads a whole array at once; these helpers read the .npy
# headers inside the zip and stream an array's rows a batch at a time, so memory stays bounded by one
# batch whatever N is (np.savez and np.savez_compressed alike). Object arrays are refused: loading
# them runs pickle.


def npz_keys(path) -> list[str]:
    """The array names in an .npz archive (np.load of an .npz reads nothing until a key is used)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        archive = None
    require(
        isinstance(archive, np.lib.npyio.NpzFile),
        path,
        "not a readable .npz archive",
        "a data.npz written by np.savez",
    )
    with archive:
        return list(archive.files)


def npz_array_header(path, key: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of `key` in the .npz without reading its data."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        shape, _, dtype = read_npy_header(path, key, member)
    return shape, dtype


def read_npy_header(path, key: str, member) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy member; object arrays are refused (pickle)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise InputError(path, f"'{key}' uses .npy format version {version}", "version 1.0 or 2.0 (np.savez)")
    require(
        not dtype.hasobject,
        path,
        f"'{key}' holds Python objects (loading them would run pickle)",
        "a numeric image array",
    )
    return shape, fortran_order, dtype


def iter_npz_batches(path, key: str, batch_size: int, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, images) batches of `key` from sample `first` on, read straight from the archive,
    so memory stays bounded by one batch whatever N is (np.savez and np.savez_compressed alike)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        shape, fortran_order, dtype = read_npy_header(path, key, member)
        if fortran_order:
            # Column-major data cannot be cut into samples while streaming: read the array once.
            with np.load(path, allow_pickle=False) as npz:
                images = np.ascontiguousarray(npz[key])
            for start in range(first, shape[0], batch_size):
                yield start, images[start : start + batch_size]
            return
        sample_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for skipped in range(0, first, batch_size):
            # Zip members are read sequentially: step over the rows already embedded, a batch at a time.
            member.read(min(batch_size, first - skipped) * sample_bytes)
        for start in range(first, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buffer = member.read(count * sample_bytes)
            require(
                len(buffer) == count * sample_bytes,
                path,
                f"'{key}' is truncated at sample {start}",
                f"{shape[0]} complete samples",
            )
            yield start, np.frombuffer(buffer, dtype=dtype).reshape((count, *shape[1:]))


def value_range(data_path, image_key: str, batch_size: int) -> tuple[float, float]:
    """One streaming pass over an array: its global min and max; a non-finite sample is an InputError."""
    low, high = np.inf, -np.inf
    for start, images in iter_npz_batches(data_path, image_key, batch_size):
        if images.dtype.kind == "f":
            finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
            first_bad = start + int(np.argmin(finite))
            require(
                finite.all(),
                data_path,
                f"'{image_key}' sample {first_bad} contains NaN or Inf",
                "finite pixels",
            )
        low, high = min(low, float(images.min())), max(high, float(images.max()))
    return low, high


# ---- checking and scaling the images of data.npz ----


def check_images(data_path, image_key):
    """Validate the image array's presence, shape and dtype and its length against class_label."""
    keys = npz_keys(data_path)
    require(
        image_key in keys,
        data_path,
        f"no '{image_key}' array (has: {', '.join(keys) or 'nothing'})",
        f"'{image_key}' images, (N,H,W,3) for rgb or (N,H,W,1) for thermal",
    )
    shape, dtype = npz_array_header(data_path, image_key)
    channels = 3 if image_key == "rgb" else 1
    good_shape = (len(shape) == 4 and shape[3] == channels) or (image_key == "thermal" and len(shape) == 3)
    require(
        good_shape and shape[0] > 0 and all(size > 0 for size in shape[1:3]),
        data_path,
        f"'{image_key}' has shape {shape}",
        f"(N,H,W,{channels}) with N >= 1 (the AWIR images are 300x300)",
    )
    require(dtype.kind in "uif", data_path, f"'{image_key}' has dtype {dtype}", "uint8 or float images")
    if "class_label" in keys:
        shape_labels, _ = npz_array_header(data_path, "class_label")
        require(
            len(shape_labels) == 1 and shape_labels[0] == shape[0],
            data_path,
            f"'{image_key}' has {shape[0]} images but class_label has shape {shape_labels}",
            "one image per class label (the TG-MATL scripts match rows by index)",
        )
    return shape, dtype


def pixel_mapping(data_path, image_key, dtype, rescale, batch_size):
    """Choose how raw pixel values become the 0-255 images the models' processors expect."""
    if dtype == np.uint8 and rescale == "auto":
        return 0.0, 1.0, "uint8 as stored"
    low, high = value_range(data_path, image_key, batch_size)
    if rescale == "minmax":
        require(high > low, data_path, f"'{image_key}' is constant ({low})", "images with some contrast")
        return low, 255.0 / (high - low), f"min-max [{low:g}, {high:g}] -> [0, 255]"
    if dtype.kind == "f" and low >= 0 and high <= 1:
        return 0.0, 255.0, "float in [0, 1], scaled by 255"
    require(
        low >= 0 and high <= 255,
        data_path,
        f"'{image_key}' values span [{low:g}, {high:g}]",
        "uint8, or values in [0, 1] or [0, 255]; pass --rescale minmax to map [min, max] to [0, 255]",
    )
    return 0.0, 1.0, "values in [0, 255]"


def to_rgb_uint8(images, offset, scale):
    """Map a raw batch to (B,H,W,3) uint8: the models were pretrained on 8-bit RGB, and a single
    thermal channel is replicated to three channels, as PIL's convert("RGB") does."""
    if images.dtype != np.uint8 or offset != 0.0 or scale != 1.0:
        images = np.clip(np.rint((images.astype(np.float64) - offset) * scale), 0, 255).astype(np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


# ---- the foundation models ----


def load_foundation_model(model_name, model_path, device):
    """Load the model and its image processor, refusing anything that would silently give random
    embeddings (another architecture, or weights missing from the checkpoint)."""
    model_class, hub_id, model_types, _ = FOUNDATION_MODELS[model_name]
    model_path = model_path or hub_id
    expected = (
        f"a local {model_name} model folder with config.json, weights and preprocessor_config.json "
        f"(save_pretrained, or `hf download {hub_id} --local-dir <folder>` on a machine with "
        "network)"
    )
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        problem = (
            "folder has no usable config.json"
            if Path(model_path).is_dir()
            else "no such folder, and the hub could not be reached for it (offline or unknown id)"
        )
        raise InputError(model_path, problem, expected) from None
    require(
        config.model_type in model_types,
        model_path,
        f"holds a '{config.model_type}' model",
        f"a {model_name} model (model_type {' or '.join(model_types)}) for --model {model_name}",
    )
    overrides = {"mask_ratio": 0.0} if model_name == "mae" else {}
    try:
        model, loading_info = model_class.from_pretrained(model_path, output_loading_info=True, **overrides)
        processor = AutoImageProcessor.from_pretrained(model_path, backend="pil")
    except (OSError, ValueError) as error:
        raise InputError(
            model_path, f"cannot load the model or its image processor ({first_line(error)})", expected
        ) from None
    missing = sorted(loading_info["missing_keys"]) + sorted(loading_info["mismatched_keys"])
    require(
        not missing,
        model_path,
        f"checkpoint lacks {len(missing)} weights (e.g. {(missing or [''])[0]})",
        f"a complete pretrained {model_name} checkpoint",
    )
    return model.to(device).eval(), processor, model_path


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@torch.no_grad()
def embed_batch(model_name, model, pixel_values):
    """One image embedding per row of `pixel_values` (B,3,H,W) -> (B,D) float32."""
    if model_name == "clip":
        # CLIP: pooled vision output through the visual projection (get_image_features), not normalised.
        return model(pixel_values=pixel_values).image_embeds
    if model_name == "dinov2":
        # DINOv2: the CLS token after the final layer norm (pooler_output).
        return model(pixel_values=pixel_values).pooler_output
    # MAE: with mask_ratio 0 the encoder keeps every patch; MAE keeps the patches whose noise ranks
    # lowest, so increasing noise keeps them in their natural order (random noise would only permute
    # them, changing the CLS in the last bits and breaking bit-for-bit re-runs).
    patch_size = model.config.patch_size
    num_patches = (pixel_values.shape[2] // patch_size) * (pixel_values.shape[3] // patch_size)
    noise = torch.arange(num_patches, dtype=pixel_values.dtype, device=pixel_values.device)
    noise = noise.expand(pixel_values.shape[0], -1)
    return model(pixel_values=pixel_values, noise=noise).last_hidden_state[:, 0]


def extract(model_name, model, processor, args, num_images, pixel_scaling, device, checkpoint):
    """Embed every image of data.npz[--input] in order, batch by batch.

    `checkpoint` holds the folder, the batches between checkpoints, the finished row chunks and the
    settings (`run.json`). Every that many batches the rows embedded since the last checkpoint are
    saved there as `rows_<first>_<end>.npy`, so an interrupted run resumes after the last of them.
    Checkpoints fall on batch boundaries, so a resumed run sees exactly the batches of an
    uninterrupted one and gives the same bits.
    """
    folder, chunks = checkpoint["folder"], list(checkpoint["chunks"])
    first_pending = sum(len(chunk) for chunk in chunks)
    pending = []
    batches = image_batches(args, first_pending)
    # --mixed_precision: float16 (CUDA) or bfloat16 (CPU with bf16) autocast; rows are kept as float32.
    autocast = precision.torch_autocast(args.mixed_precision, device)
    with progress.bar(
        total=num_images,
        initial=first_pending,
        desc=f"{model_name} embeddings",
        unit="img",
        enabled=args.progress,
    ) as bar:
        for start, images in batches:
            rgb = to_rgb_uint8(images, *pixel_scaling)
            pixel_values = processor(
                images=list(rgb), return_tensors="pt", input_data_format="channels_last"
            )["pixel_values"]
            with autocast:
                embeddings = embed_batch(model_name, model, pixel_values.to(device))
            pending.append(embeddings.float().cpu().numpy())
            bar.update(len(images))
            end = start + len(images)
            if len(pending) == checkpoint["batches"] and end < num_images:
                chunks.append(np.concatenate(pending))
                if not folder.exists():
                    folder.mkdir(parents=True)
                    atomic.write_json(folder / "run.json", checkpoint["settings"])
                save_row_chunk(folder, first_pending, chunks[-1])
                first_pending, pending = end, []
    return np.concatenate(chunks + pending).astype(np.float32, copy=False)


def image_batches(args, first: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, images) batches of data.npz[--input] from row `first` on; with `--shard K/N` only the
    shard's batches (`common.parallel.shard_batches`), `start` counting the shard's own rows."""
    shard = parallel.parse_shard(args.shard)
    if shard is None:
        yield from iter_npz_batches(args.data, args.input, args.batch_size, first=first)
        return
    row = 0
    batches = iter_npz_batches(args.data, args.input, args.batch_size)
    for _, images in itertools.islice(batches, shard[0] - 1, None, shard[1]):
        if row >= first:
            yield row, images
        row += len(images)


# ---- checkpoints: the rows embedded so far, saved in chunks ----


def save_row_chunk(folder, first: int, rows: np.ndarray) -> Path:
    """Save `rows` (the rows from `first` on) as `<folder>/rows_<first>_<end>.npy`, atomically."""
    path = Path(folder) / f"rows_{first:09d}_{first + len(rows):09d}.npy"
    atomic.save_npy(path, rows)
    return path


def load_row_chunks(folder) -> list[np.ndarray]:
    """The `rows_<first>_<end>.npy` chunks of `folder` in order; a gap or a wrong length is an InputError."""
    chunks, next_row = [], 0
    for chunk_file in sorted(Path(folder).glob("rows_*.npy")):
        first, end = (int(part) for part in chunk_file.stem.split("_")[1:])
        chunk = np.load(chunk_file, allow_pickle=False)
        require(
            first == next_row and chunk.shape[0] == end - first,
            chunk_file,
            f"chunk does not continue at row {next_row}",
            "contiguous checkpoint chunks (--overwrite to start over)",
        )
        chunks.append(chunk)
        next_row = end
    return chunks


def load_checkpoint(checkpoint_dir, settings, resume, overwrite):
    """The row chunks an interrupted run of this same extraction finished (none for a fresh start)."""
    if checkpoint_dir.exists() and overwrite and not resume:
        shutil.rmtree(checkpoint_dir)
    if not checkpoint_dir.exists():
        return []
    require(
        resume,
        checkpoint_dir,
        "an interrupted extraction left partial embeddings here",
        "--resume to continue it, or --overwrite to start over",
    )
    run_file = checkpoint_dir / "run.json"
    require(
        run_file.is_file(), checkpoint_dir, "partial embeddings without run.json", "--overwrite to start over"
    )
    # Rows made from another data file, model or setting must not be mixed in, even with --overwrite
    # (which together with --resume means: keep the partial rows).
    runs.check_same_settings(
        run_file,
        settings,
        what="the partial embeddings",
        hint="the same settings, or --overwrite to start over",
    )
    return load_row_chunks(checkpoint_dir)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError("--device", f"unknown device {name!r}", "auto, cpu, cuda or cuda:<index>") from None
    require(
        device.type != "cuda" or torch.cuda.is_available(),
        "--device",
        f"{name} requested but PyTorch sees no CUDA GPU",
        "auto or cpu on this machine",
    )
    return device


def embeddings_file(embeddings_dir, model_name):
    return Path(embeddings_dir) / f"awir_{model_name}_emb.npy"


def write_embeddings(output, embeddings, args, derived):
    """awir_<model>_emb.npy and its .json record (arguments, versions, settings, timing)."""
    record = runs.run_record(args)
    record["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
    record["derived"] = {**derived, "shape": list(embeddings.shape), "dtype": "float32"}
    atomic.save_npy(output, embeddings)
    atomic.write_json(output.with_suffix(".json"), record)
    paper_width = FOUNDATION_MODELS[derived["model"]][3]
    if embeddings.shape[1] != paper_width:
        print(
            f"note: {embeddings.shape[1]}-d embeddings; the paper's {derived['model']} checkpoint gives "
            f"{paper_width}-d"
        )


def run_extraction(args, model_name, model_path, device):
    """Validate, load, extract and write awir_<model>_emb.npy (+ .json record) for one model; with
    `--shard K/N` the part `awir_<model>_emb.npy.shards/K_of_N.npy` (+ .json) of the shard's rows."""
    if args.merge:
        return merge_embeddings(args, model_name)
    shard = parallel.parse_shard(args.shard)
    final = embeddings_file(args.embeddings_dir, model_name)
    output = parallel.shard_path(final, shard, ".npy") if shard else final
    if output.exists() and not args.overwrite:
        require(
            args.resume,
            output,
            "embeddings exist already",
            "--overwrite to replace them, or another --embeddings_dir",
        )
        print(f"{model_name}: {output} is complete; nothing to resume")
        return output, np.load(output, mmap_mode="r").shape
    shape, dtype = check_images(args.data, args.input)
    offset, scale, mapping = pixel_mapping(args.data, args.input, dtype, args.rescale, args.batch_size)
    print(f"data: {args.data} '{args.input}' {shape} {dtype} ({mapping})")
    model, processor, model_path = load_foundation_model(model_name, model_path, device)
    print(
        f"model: {model_name} from {model_path} ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) on {device}"
    )

    checkpoint_dir = output.parent / f".{output.stem}.partial"
    # Input paths relative to the checkpoint folder: embeddings moved together with their inputs resume
    # (a shard's relative to the one of a whole run, so that its parts record what that run would).
    relative_to = final.parent / f".{final.stem}.partial"
    local_model = Path(model_path).is_dir()
    settings = {
        "data": runs.input_path_record(args.data, relative_to),
        **runs.settings_of(args, RESUME_SETTINGS),
        "num_images": shape[0],
        "pixel_mapping": mapping,
        "model": model_name,
        "model_path": runs.input_path_record(model_path, relative_to) if local_model else model_path,
    }
    rows = len(parallel.shard_rows(shape[0], args.batch_size, shard)) if shard else shape[0]
    if shard:
        settings["shard"] = f"{shard[0]}/{shard[1]}"
        print(f"shard {args.shard}: {rows} of the {shape[0]} images -> {output}")
    finished_chunks = load_checkpoint(checkpoint_dir, settings, args.resume, args.overwrite)
    resumed_rows = sum(len(chunk) for chunk in finished_chunks)
    if resumed_rows:
        print(f"resume: {resumed_rows} of {rows} images embedded before the interruption")
    checkpoint = {
        "folder": checkpoint_dir,
        "batches": max(1, -(-args.checkpoint_every // args.batch_size)),
        "chunks": finished_chunks,
        "settings": settings,
    }
    started = time.perf_counter()
    embeddings = extract(model_name, model, processor, args, rows, (offset, scale), device, checkpoint)
    seconds = time.perf_counter() - started
    # A non-finite embedding means a broken checkpoint; the TG-MATL scripts would reject the file.
    require(
        np.isfinite(embeddings).all(),
        model_path,
        "the model produced NaN or Inf embeddings",
        "a working checkpoint",
    )
    derived = {**settings, "device": str(device), "seconds": round(seconds, 3), "resumed_rows": resumed_rows}
    write_embeddings(output, embeddings, args, derived)
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    images_per_second = (rows - resumed_rows) / max(seconds, 1e-9)
    print(
        f"{model_name}: {output} {embeddings.shape} float32 in {seconds:.1f} s "
        f"({images_per_second:.1f} images/s)"
    )
    return output, embeddings.shape


# Fields of a part's record that are its own, not the settings every part shares.
PART_FIELDS = ("shard", "device", "seconds", "resumed_rows", "shape", "dtype")


def merge_embeddings(args, model_name):
    """--merge: the finished `--shard K/N` parts of awir_<model>_emb.npy, each row put back where the
    one-process run has it, written (+ .json record) as that run writes them."""
    output = embeddings_file(args.embeddings_dir, model_name)
    require(
        args.overwrite or not output.exists(),
        output,
        "embeddings exist already",
        "--overwrite to replace them",
    )
    parts = parallel.shard_parts(output, ".npy", lambda part: part.with_suffix(".json").is_file())
    records = [json.loads(part.with_suffix(".json").read_text())["derived"] for part in parts]
    settings = {key: value for key, value in records[0].items() if key not in PART_FIELDS}
    embeddings = None
    for index, (part, record) in enumerate(zip(parts, records, strict=True), start=1):
        require(
            record.get("shard") == f"{index}/{len(parts)}"
            and {key: value for key, value in record.items() if key not in PART_FIELDS} == settings,
            part.with_suffix(".json"),
            "was made with other settings than shard 1",
            "parts of one command line that differs only in --shard",
        )
        rows = parallel.shard_rows(settings["num_images"], settings["batch_size"], (index, len(parts)))
        if embeddings is None:
            embeddings = np.empty((settings["num_images"], record["shape"][1]), np.float32)
        part_rows = np.load(part, allow_pickle=False)
        expected = (len(rows), embeddings.shape[1])
        require(
            part_rows.shape == expected, part, f"has shape {part_rows.shape}", f"{expected}, a finished shard"
        )
        embeddings[rows] = part_rows
    seconds = sum(record["seconds"] for record in records)  # the parts' time, not the wall time
    derived = {**settings, "device": records[0]["device"], "seconds": round(seconds, 3), "resumed_rows": 0}
    write_embeddings(output, embeddings, args, derived | {"merged_shards": len(parts)})
    print(f"{model_name}: {output} {embeddings.shape} float32 merged from {len(parts)} shards")
    return output, embeddings.shape


# ---- demo: tiny random models and a synthetic data.npz in the real formats ----


def make_demo_data(path, num_samples, rng):
    """AWIR-like data.npz: 300x300 scenes with one warm object whose box shape depends on the class."""
    class_label = np.arange(num_samples) % 3
    rng.shuffle(class_label)
    size = 300
    rgb = rng.integers(40, 110, size=(num_samples, size, size, 3), dtype=np.uint8)
    thermal = rng.integers(10, 60, size=(num_samples, size, size, 1), dtype=np.uint8)
    box_label = np.zeros((num_samples, 4), dtype=np.int64)
    for index, label in enumerate(class_label):
        # Class 0: small squares, class 1: wide boxes, class 2: tall boxes.
        width, height = [(30, 30), (90, 30), (30, 90)][label] + rng.integers(-8, 9, size=2)
        xmin, ymin = rng.integers(0, size - width), rng.integers(0, size - height)
        box_label[index] = xmin, xmin + width, ymin, ymin + height
        rgb[index, ymin : ymin + height, xmin : xmin + width] = (200, 180 - 60 * label, 60 * label)
        thermal[index, ymin : ymin + height, xmin : xmin + width] = 220
    with atomic.atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, class_label=class_label, box_label=box_label, rgb=rgb, thermal=thermal)


def make_demo_models(folder):
    """Tiny randomly initialised checkpoints saved like the hub's: a full CLIPModel, a Dinov2Model and a
    ViTMAEForPreTraining, each with its image processor. Output widths match the real models."""
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    vit = {"image_size": 32, "patch_size": 8, "num_hidden_layers": 1}
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 64,
                "max_position_embeddings": 8,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
            vision_config={"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, **vit},
            projection_dim=512,
        )
    )
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=768, num_attention_heads=12, mlp_ratio=1, **vit))
    mae = ViTMAEForPreTraining(
        ViTMAEConfig(
            hidden_size=768,
            num_attention_heads=12,
            intermediate_size=64,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
            **vit,
        )
    )
    processors = {
        "clip": CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "dinov2": BitImageProcessorPil(
            size={"shortest_edge": 36},
            crop_size={"height": 32, "width": 32},
            do_center_crop=True,
            do_convert_rgb=True,
            **imagenet,
        ),
        "mae": ViTImageProcessorPil(size={"height": 32, "width": 32}, **imagenet),
    }
    paths = {}
    for name, model in (("clip", clip), ("dinov2", dinov2), ("mae", mae)):
        paths[name] = Path(folder) / name
        model.save_pretrained(paths[name])
        processors[name].save_pretrained(paths[name])
    return paths


def check_arguments(args) -> None:
    """Every numeric flag in range and the output folders writable, before anything is written."""
    for flag, high in (("batch_size", MAX_BATCH), ("checkpoint_every", None), ("demo_samples", 100_000)):
        value = getattr(args, flag)
        bound = f"a positive integer up to {high}" if high else "a positive integer"
        require(value >= 1 and (high is None or value <= high), f"--{flag}", f"is {value}", bound)
    require(0 <= args.seed <= MAX_SEED, "--seed", f"is {args.seed}", f"an integer in [0, {MAX_SEED}]")
    parallel.shard_of(args)
    awir.require_writable_dir(args.embeddings_dir, "--embeddings_dir")
    if args.demo:
        awir.require_writable_dir(args.results_dir)


@cli_entry
def main(args):
    check_arguments(args)
    seed_torch(args.seed)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    demo_dir = Path(args.results_dir) / "demo_data" / "extract_embeddings"
    refresh_demo_embeddings = args.demo and "embeddings_dir" not in cli.typed_flags(args)
    if refresh_demo_embeddings:
        args.embeddings_dir = str(demo_dir / "embeddings")
    runs.print_args(args)
    device = resolve_device(args.device)

    if not args.demo:
        # ---- data, model, extract ----
        require_file(args.data, "a data.npz with the images")
        run_extraction(args, args.model, args.model_path, device)
        return

    # ---- demo data and models ----
    print(f"demo: building {args.demo_samples} synthetic images and tiny random models in {demo_dir}")
    args.data = str(demo_dir / "data.npz")
    make_demo_data(args.data, args.demo_samples, np.random.default_rng(args.seed))
    model_paths = make_demo_models(demo_dir)
    # The demo regenerates its own data, so its own embeddings are always refreshed (but never a folder
    # the user named without --overwrite).
    args.overwrite = args.overwrite or refresh_demo_embeddings

    # ---- extract ----
    shapes = {}
    for model_name, model_path in model_paths.items():
        _, shapes[model_name] = run_extraction(args, model_name, model_path, device)
    print(
        "demo: "
        + ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        + f" -> {args.embeddings_dir}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
