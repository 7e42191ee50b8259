"""TerraMind v1 tokens of the LUCAS chips, from a local checkpoint: the study's frozen-backbone features.

Source study: the TerraMind geospatial foundation model (IBM / ESA, arXiv 2504.11171) probed frozen on
LUCAS 2018 points in Italy (Politecnico di Milano, "Geospatial Foundation Models" project): 1,994
chips of 224 x 224 px, 6 bands [B4, B3, B2, B8, B11, B12]. The study ran terratorch's
`terramind_v1_base` on the raw S2L2A modality and took the tokens of encoder layer 11
(`SelectIndices [11]`, the last of 12, after the final norm) into its identity and MLP decoders.
This script computes those tokens with the Keras port in `common/terramind.py` (the same numbers as
terratorch's encoder: test_keras_encoder_equals_the_reference_fixture) and writes them as the `.npy`
that `train_lucas_classifier.py --embeddings` reads: `(N, 196, D)` in labels-CSV order, D = 192 / 384
/ 768 / 1024 for tiny / small / base / large.

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
--embeddings <tokens> --grid`) takes about 35 s and ends with the probe's summary line:
    summary (val, 1 seed): wce/identity OA 0.694+-0.000 macc 0.710+-0.000 mF1 0.676+-0.000; wce/mlp OA
    0.694+-0.000 macc 0.809+-0.000 mF1 0.751+-0.000; focal/identity OA 0.612+-0.000 macc 0.500+-0.000
    mF1 0.495+-0.000; focal/mlp OA 0.714+-0.000 macc 0.753+-0.000 mF1 0.734+-0.000
"""

import hashlib
import json
import os
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

from common import atomic, cli, lucas, pipelines, runs, terramind
from common.errors import InputError, cli_entry, require, require_file

SCRIPT_STEM = "extract_terramind_embeddings"
# The chips' bands [B4, B3, B2, B8, B11, B12] in terratorch's band names, and the study's declaration.
BAND_MAPPINGS = {
    "correct": ["RED", "GREEN", "BLUE", "NIR_BROAD", "SWIR_1", "SWIR_2"],
    "study": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"],
}
REFLECTANCE_SCALE = 10000.0  # S2L2A digital numbers = reflectance x 10000, the pretraining data's units
SAVE_EVERY_SECONDS = 30.0  # flush the outputs and record progress at most this far apart
# The arguments that change the tokens; a resumed extraction must keep them.
RESULT_SETTINGS = [
    "data_root",
    "labels_csv",
    "variant",
    "layer",
    "band_mapping",
    "normalisation",
    "save_mean",
]


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
    add(
        "--variant", default="base", choices=list(terramind.VARIANTS), help="TerraMind v1 size (study: base)."
    )
    add(
        "--layer", type=int, default=11, help="Encoder layer whose tokens are kept (study: SelectIndices 11)."
    )
    add("--save_mean", action="store_true", help="Also write the mean over tokens, (N, D), as mean.npy.")
    add("--batch_size", type=int, default=8, help="Chips per forward pass (memory, not results).")
    demo = parser.add_argument_group("demo")
    cli.add_demo_argument(demo, "with a random TerraMind-shaped checkpoint, then the probe grid.")
    demo.add_argument("--demo_scale", type=float, default=0.12, help="Demo chips per class = study x this.")
    demo.add_argument("--demo_epochs", type=int, default=30, help="Epochs of the demo's probe grid.")
    cli.add_run_arguments(parser)
    parser.demo_defaults(variant="tiny", save_mean=True)
    return parser


# ---- bands and standardisation ----


def band_preprocessing(band_mapping, normalisation, chip_mean=None, chip_std=None):
    """Pretrained band names per chip channel, and the scale, mean and std that standardise the chips.

    Returns:
        (bands, scale, mean, std): chips are standardised as (chips x scale - mean) / std per band.
    """
    bands = BAND_MAPPINGS[band_mapping]
    if normalisation == "dataset":
        return bands, 1.0, np.asarray(chip_mean, np.float32), np.asarray(chip_std, np.float32)
    index = [terramind.PRETRAINED_BANDS.index(band) for band in bands]
    mean = np.asarray(terramind.V1_S2L2A_MEAN, np.float32)[index]
    return bands, REFLECTANCE_SCALE, mean, np.asarray(terramind.V1_S2L2A_STD, np.float32)[index]


def standardise(chips, scale, mean, std):
    """`(B, H, W, 6)` reflectance -> standardised float32 encoder input."""
    return ((np.asarray(chips, np.float32) * np.float32(scale) - mean) / std).astype(np.float32)


def chip_statistics(reader, count, batch_size):
    """Per-band mean and (population) std over every pixel of every chip, as the study computed them."""
    with reader.surface():
        batches = reader.dataset(np.arange(count), None, max(32, batch_size)).as_numpy_iterator()
        mean, variance = pipelines.band_statistics(batches)
    return mean, np.sqrt(variance)


# ---- checkpoint ----


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

    config, rng = terramind.VARIANTS[variant], np.random.default_rng(seed)
    tensors = {}
    for name, shape in terramind.encoder_parameter_shapes(config).items():
        if name.endswith("pos_emb"):
            value = terramind.sincos_position_embedding(round(shape[1] ** 0.5), config.dim)
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


# ---- extraction ----


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


def extract(encoder, reader, preprocessing, arrays, first, batch_size, progress):
    """Stream tokens of chips `first..N-1` into the memory maps; `progress(rows)` after each flush.

    A flush plus progress record at most SAVE_EVERY_SECONDS apart: an interrupted run loses at most
    that much work, and every row the record counts is on disk. Returns (chips, seconds) of this call.
    """
    count = arrays["tokens"].shape[0]
    start_time, last_save, row = time.monotonic(), time.monotonic(), first
    with reader.surface():
        for chips in reader.dataset(np.arange(first, count), None, batch_size).as_numpy_iterator():
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


def prepare_extraction(args, settings):
    """The run folder and the chips already done: all (finished run, --resume), some (interrupted), 0."""
    name = args.run_name or f"terramind_v1_{args.variant}_{args.band_mapping}_{args.normalisation}"
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


def run_probe_demo(args, labels_csv, tokens_path):
    """The demo's last step: train_lucas_classifier.py --embeddings <tokens> --grid on the demo chips."""
    import train_lucas_classifier

    argv = ["--labels_csv", labels_csv, "--embeddings", tokens_path, "--grid", "--epochs", args.demo_epochs]
    argv += ["--learning_rate", "1e-3", "--results_dir", args.results_dir, "--run_name", "terramind_demo"]
    argv += ["--overwrite"] if args.overwrite else []
    print("probe: train_lucas_classifier.py " + " ".join(map(str, argv)))
    train_lucas_classifier.main(train_lucas_classifier.get_args_parser().parse_args(list(map(str, argv))))


def prepare_demo(args):
    """Demo chips (the LUCAS demo generator) and a random TerraMind-shaped checkpoint, written once."""
    folder = cli.demo_data_dir(args, SCRIPT_STEM)
    args.data_root = str(lucas.write_demo_chips(folder / "chips", args.demo_scale))
    checkpoint = folder / f"TerraMind_v1_{args.variant}_random.safetensors"
    if not checkpoint.is_file():
        write_random_checkpoint(checkpoint, args.variant, args.seed)
    args.checkpoint = str(checkpoint)


def write_outputs(run_dir, encoder, reader, preprocessing, first, args, record):
    """Extract (or continue), rename the finished `.partial.npy` files, write extraction.json last."""
    shape = record["shape"]
    arrays = open_outputs(run_dir, shape, args.save_mean, fresh=first == 0)

    def progress(rows):
        atomic.write_json(run_dir / "progress.json", {"settings": record["settings"], "rows": rows})

    if first == 0:
        progress(0)
    chips_done, seconds = extract(encoder, reader, preprocessing, arrays, first, args.batch_size, progress)
    del arrays  # closes the memory maps before their files are renamed
    for name in ("tokens", "mean")[: 1 + args.save_mean]:
        os.replace(run_dir / f"{name}.partial.npy", run_dir / f"{name}.npy")
    speed = chips_done / max(seconds, 1e-9)
    record |= {"chips_extracted": chips_done, "seconds": seconds, "chips_per_second": speed}
    atomic.write_json(run_dir / "extraction.json", runs.run_record(args) | record)
    (run_dir / "progress.json").unlink()
    where = run_dir / "tokens.npy"
    print(f"tokens {shape} -> {where}; {chips_done} chips in {seconds:.1f} s ({speed:.2f} chips/s)")


def prepare_encoder(args, tensors, loaded, reader, image_size):
    """Band mapping, standardisation and the encoder with the checkpoint's `tensors`; prints them.

    Returns:
        The encoder, the preprocessing of `band_preprocessing` and their record for extraction.json.
    """
    count = len(reader.paths)
    chip_mean, chip_std = chip_statistics(reader, count, args.batch_size)
    preprocessing = band_preprocessing(args.band_mapping, args.normalisation, chip_mean, chip_std)
    bands, scale, mean, std = preprocessing
    encoder = terramind.build_encoder(terramind.VARIANTS[args.variant], image_size, len(bands), args.layer)
    terramind.assign_weights(encoder, tensors, bands, image_size)
    shape = (count, *encoder.output.shape[1:])
    grid = image_size // terramind.PATCH_SIZE
    print(f"chips: {count} of {image_size} px -> {grid} x {grid} tokens of {shape[2]} (layer {args.layer})")
    print("bands: " + ", ".join(f"{b} -> {w}" for b, w in zip(lucas.BAND_NAMES, bands, strict=True)))
    rounded = [np.round(values.astype(np.float64), 3).tolist() for values in (mean, std)]
    print(f"standardisation: x {scale:g}, mean {rounded[0]}, std {rounded[1]}")
    print(
        f"checkpoint: {loaded['encoder_tensors']} encoder tensors, {loaded['ignored_tensors']} others unused"
    )
    print(f"output: {np.prod(shape) * 4 / 2**30:.3f} GiB of float32 tokens")
    record = {"checkpoint": loaded, "bands": dict(zip(lucas.BAND_NAMES, bands, strict=True)), "scale": scale}
    record |= {"mean": mean, "std": std, "chip_mean": chip_mean, "chip_std": chip_std}
    return encoder, preprocessing, record | {"shape": shape, "layer": args.layer}


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    if args.demo:
        prepare_demo(args)
    runs.print_args(args)
    require(args.data_root, "--data_root", "no chips given", "--data_root <chips folder>, or --demo")
    require(args.checkpoint, "--checkpoint", "no checkpoint given", "a local TerraMind_v1_<variant>.pt")
    depth = terramind.VARIANTS[args.variant].depth
    require(0 <= args.layer < depth, "--layer", f"{args.layer}", f"0..{depth - 1} for v1 {args.variant}")
    require(args.batch_size >= 1, "--batch_size", f"{args.batch_size}", "an integer >= 1")

    # ---- data ----
    labels_csv = Path(args.labels_csv or Path(args.data_root) / lucas.LABELS_CSV_NAME)
    point_ids, labels = lucas.read_labels(labels_csv)
    paths, sizes = lucas.locate_chips(args.data_root, labels_csv, point_ids, labels)
    image_size = lucas.chip_size(sizes, None, args.data_root)
    problem = f"has {image_size} px chips"
    require(image_size % terramind.PATCH_SIZE == 0, args.data_root, problem, "chips of a multiple of 16 px")
    reader = lucas.ChipReader(paths)
    checkpoint = require_file(args.checkpoint, "a TerraMind checkpoint (.pt or .safetensors)")
    settings = runs.settings_of(args, RESULT_SETTINGS) | {"chips": len(paths), "image_size": image_size}
    settings["checkpoint_sha256"] = file_sha256(checkpoint)
    # The checkpoint is checked before the run folder is made: a wrong file leaves nothing behind.
    tensors, loaded = terramind.read_encoder_tensors(checkpoint, args.variant)
    run_dir, first = prepare_extraction(args, settings)

    # ---- model ----
    if first < len(paths):
        encoder, preprocessing, record = prepare_encoder(args, tensors, loaded, reader, image_size)
        record |= {"settings": settings, "labels_csv_order": str(labels_csv)}

        # ---- extract ----
        write_outputs(run_dir, encoder, reader, preprocessing, first, args, record)
    if args.demo:
        run_probe_demo(args, labels_csv, run_dir / "tokens.npy")
    return run_dir


if __name__ == "__main__":
    main(get_args_parser().parse_args())
