"""ARAS400k dataset creation: Sentinel-2 RGBNIR composites + WorldCover maps -> 256 px PNG pairs.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k), arXiv 2603.09625. This script rebuilds the 100k real patches of the dataset: each
ESA WorldCover 2021 S2 RGBNIR composite tile is cut into 256 x 256 patches from its top-left corner,
the WorldCover maps it overlaps are resampled onto each patch's exact pixel grid
(`common.aras400k.worldcover`), the 11 codes are remapped to the paper's 7 classes, patches with
no-data or more than 90 % water are dropped, and the rest are written as RGB PNGs with colour-coded
masks, a manifest, a report of the drops, per-split class-percentage tables and a spatial split by
tile (docs/aras400k.md, "dataset_creator.py") in segmentation_train.py's layout. Inputs are searched
recursively, so the one-folder-per-product layout of `dataset_downloader.py` is read as it is.

What lets a build stop, continue, run as N independent shards and be merged into exactly the folder
one unsharded run writes:

- one journal per tile, `<out>/.progress/<tile>.jsonl`, a line per finished patch (`read_journal`);
- the seeded split of tiles (or, for small inputs, of patches) into train/val/test (`split_names`);
- `--shard K/N`: tiles dealt round-robin in id order, shard K writing `<out>/shards/K_of_N/`;
- `manifest.csv`, `report.json`, `.progress/tiles.json` and `class_percentages/<split>.csv` built
  from the journals, and the patch files moved into their split folders (`finish_build`);
- `--merge`: the shards' journals and tile records joined, then `finish_build` as one run
  (`merge_shards`).

Commands:
    python dataset_creator.py --demo
    python dataset_creator.py --s2_dir S2RGB_2021 --map_dir worldcover_2021 --out ARAS400k --workers 2
    python dataset_creator.py --out ARAS400k --shard 3/8 ...   # one job of 8; then: --out ARAS400k --merge
    python dataset_creator.py --percentages synth/train/masks  # -> synth/class_percentages/train.csv

Runtime: the demo takes about 3 s of CPU (a few seconds on a laptop); a full 10980 x 10980 tile
(1764 patches) takes 14-18 CPU seconds per worker, 100-125 patches per CPU second, with a peak
resident memory of about 118 MB (python -m bench.dataset_creator_speed). It prints one line per
tile, then a summary with the numbers of report.json["totals"]; the demo's (the seconds depend on
the CPU and its load):
    summary: tiles 2 (failed 0), patches 18, kept 14 (train 11, val 2, test 1), split by patch, dropped
    label_nodata 1, image_nodata 2, water 1, 5.4 s
"""

import argparse
import json
import os
import random
import shutil
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.windows import Window

from common import atomic, cli, parallel, progress, runs
from common.aras400k import classes, demo_data, patches, percentages, worldcover
from common.errors import InputError, cli_entry, require, require_dir
from common.raster import open_geotiff, patch_windows, read_window, write_geotiff

# The settings a dataset folder is built with: a re-run continues it only with the same ones (with
# the derived percentiles, split ratios, shard and tile list, see main).
RESUME_SETTINGS = (
    "patch_size",
    "stride",
    "max_water_fraction",
    "scaling",
    "max_reflectance",
    "percentile_windows",
    "bands",
    "image_format",
    "seed",
    "split_level",
)


DROP_REASONS = ("label_nodata", "image_nodata", "water")
# manifest.csv: a patch's place, bounds and CRS, then the fraction of each class in its mask.
MANIFEST_FIELDS = ["patch", "split", "tile", "row", "col", "left", "bottom", "right", "top", "crs"] + [
    f"frac_{name}" for name in classes.CLASS_KEYS
]
PATCH_LEVEL_NOTE = (
    "patch-level split: patches of one tile sit in several splits, so neighbouring, correlated patches "
    "are in train and test and test scores are optimistic; for inputs with fewer than 3 tiles only"
)


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--s2_dir",
        default="S2RGB_2021",
        help="Folder of WorldCover 2021 S2 RGBNIR composites (*_S2RGBNIR.tif).",
    )
    add(
        "--map_dir",
        default="worldcover_2021",
        help="Folder of WorldCover 2021 maps (*_Map.tif, uint8 codes).",
    )
    add("--out", default="", help="Output dataset folder (empty: <results_dir>/dataset_creator/<run_name>).")
    add("--patch_size", type=int, default=256, help="Patch side in pixels.")
    add("--stride", type=int, default=256, help="Grid step in pixels (follows a typed --patch_size).")
    add(
        "--max_water_fraction",
        type=float,
        default=0.9,
        help="Drop a patch whose water fraction exceeds this.",
    )
    # patch_max divides by the patch's own maximum (the reference); fixed maps reflectance DN/10000
    # clipped to --max_reflectance; percentile maps each band's 2-98 % of a sample of the scene.
    scalings = ("patch_max", "fixed", "percentile")
    add(
        "--scaling", choices=scalings, default="patch_max", help="8-bit scaling (README: dataset_creator.py)."
    )
    add("--max_reflectance", type=float, default=0.3, help="Reflectance mapped to 255 by --scaling fixed.")
    add(
        "--percentiles",
        type=float,
        nargs=2,
        default=(2.0, 98.0),
        help="Percentiles for --scaling percentile.",
    )
    add("--percentile_windows", type=int, default=64, help="Random windows per tile for the percentiles.")
    add(
        "--bands",
        choices=("rgb", "rgbnir"),
        default="rgb",
        help="rgb = 3-band PNG; rgbnir: channel 4 is NIR.",
    )
    add("--image_format", choices=("png", "tif"), default="png", help="png, or an 8-bit GeoTIFF per patch.")
    add("--split", default="0.8,0.1,0.1", help="train,val,test ratios, or 'none' (one flat folder).")
    add(
        "--split_level",
        choices=("tile", "patch"),
        default="tile",
        help="tile: the paper's spatial split BY TILE; patch: split patches (inputs of < 3 tiles; "
        "neighbouring patches then share splits, labelled so in report.json).",
    )
    add(
        "--shard", default="", help="K/N: build only shard K of N (every N-th tile) into <out>/shards/K_of_N."
    )
    add(
        "--merge",
        action="store_true",
        help="Join the finished shards of <out> into one dataset and split it.",
    )
    add("--percentages", default="", help="Only write the class-percentage CSV of this mask folder to --out.")
    cli.add_workers_argument(parser, what="one tile each")
    add(
        "--keep_going", action="store_true", help="Process the other tiles when one is bad (see report.json)."
    )
    add("--cache_mb", type=int, default=256, help="GDAL block cache per worker in MB.")
    cli.add_demo_argument(parser, "(two small GeoTIFF pairs, a few seconds).")
    add("--demo_size", type=int, default=768, help=argparse.SUPPRESS)
    cli.add_run_arguments(parser, resume=False)
    progress.add_argument(parser)
    parser.demo_defaults(split_level="patch")  # the demo's two tiles cannot fill three splits by tile
    return parser


# ---- 8-bit scaling ----


def scaling_tables(scaling, max_reflectance=0.3, low_high=None):
    """Per-band look-up tables DN -> uint8 for the scalings that do not depend on the patch.

    fixed: reflectance DN/10000 clipped to [0, max_reflectance], mapped to [0, 255]; percentile: each
    band's scene-wide [low, high] percentiles mapped to [0, 255]. Both truncate like patch_max.
    """
    values = np.arange(65536, dtype=np.float64)
    if scaling == "fixed":
        top = max(round(max_reflectance * 10000), 1)
        return np.tile(np.minimum(values, top) * 255 // top, (4, 1)).astype(np.uint8)
    if scaling == "percentile":
        low, high = (np.asarray(v, np.float64)[:, None] for v in low_high)
        return np.floor(np.clip((values - low) * 255 / np.maximum(high - low, 1e-6), 0, 255)).astype(np.uint8)
    return None


def scale_to_uint8(image, scaling, bands, tables=None):
    """(bands, rows, cols) uint16 DNs -> (rows, cols, channels) uint8 in OpenCV's B,G,R(,NIR) order.

    patch_max is the reference's `patch / patch.max() * 255` truncated to uint8, computed exactly in
    integers as floor(DN * 255 / max). The reference reads R, G, B only, so the maximum is over those
    three bands; with --bands rgbnir the NIR channel is scaled by its own maximum, and the RGB
    channels are the same as with --bands rgb.
    """
    order = [2, 1, 0] if bands == "rgb" else [2, 1, 0, 3]
    if scaling == "patch_max":
        peaks = [max(int(image[:3].max()), 1)] * 3 + [max(int(image[3].max()), 1)]
        channels = [image[band].astype(np.uint32) * 255 // peaks[band] for band in order]
        return cv2.merge([channel.astype(np.uint8) for channel in channels])
    return cv2.merge([np.take(tables[band], image[band]) for band in order])


def scene_percentiles(dataset, path, patch_size, count, percentiles, rng):
    """Per-band (low, high) percentiles of valid pixels in `count` random patch windows of the scene."""
    samples = []
    rows, cols = dataset.height - patch_size + 1, dataset.width - patch_size + 1
    for _ in range(count):
        window = Window(int(rng.integers(cols)), int(rng.integers(rows)), patch_size, patch_size)
        block = read_window(dataset, window, path=path).reshape(dataset.count, -1)
        samples.append(block[:, block.any(axis=0)])
    values = np.concatenate(samples, axis=1)
    if values.shape[1] == 0:
        return None
    low, high = np.percentile(values, percentiles, axis=1)
    return low.astype(np.float32), high.astype(np.float32)


def tile_percentiles(image, job, settings):
    """--scaling percentile: the scene's per-band percentiles, sampled with (seed, tile) windows."""
    size = settings["patch_size"]
    if settings["scaling"] != "percentile" or min(image.height, image.width) < size:
        return None
    rng = np.random.default_rng([settings["seed"], zlib.crc32(job["tile"].encode())])
    count, percentiles = settings["percentile_windows"], settings["percentiles"]
    low_high = scene_percentiles(image, job["s2_path"], size, count, percentiles, rng)
    expected = "image data for --scaling percentile (or another --scaling)"
    require(low_high is not None, job["s2_path"], "has no valid pixel in the sampled windows", expected)
    return low_high


# ---- one tile ----


def write_file(folder, name, data):
    """Write bytes to a temporary name and rename it into place (a killed run leaves no partial file).

    Unlike common.atomic.write_bytes this skips fsync and Python's buffered file object: two fsyncs
    per patch would dominate the run time. The tile's journal is written after the files, so
    a patch whose files were lost is simply made again on the next run.
    """
    path, temporary = f"{folder}/{name}", f"{folder}/.{name}.{os.getpid()}.tmp"  # plain strings: per patch
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(handle, view) :]
    finally:
        os.close(handle)
    os.replace(temporary, path)


def patch_status(codes, pixels, nodata, max_water_fraction):
    """The paper's filters, first matching reason counted: no label, no image data, mostly water."""
    if codes[0]:
        return "label_nodata"
    if not pixels.any(axis=0).all() or (nodata is not None and (pixels == nodata).all(axis=0).any()):
        return "image_nodata"
    if codes[classes.WATER_CODE] > max_water_fraction * codes.sum():
        return "water"
    return "kept"


def process_tile(job):
    """Cut one S2 tile into patches; return a summary, or the tile's failure as a dict.

    Each finished patch (kept or dropped) is appended to the tile's journal after its files are in
    place, so a re-run skips it. Failures come back as data (not raised) so they cross process
    boundaries intact; the tile's own files are removed so the dataset never holds half a tile.
    """
    tile, settings = job["tile"], job["settings"]
    folders = {kind: Path(job["folders"][kind]) for kind in ("images", "masks")}
    journal_path = Path(job["journal"])
    extension = "." + settings["image_format"]
    size, stride = settings["patch_size"], settings["stride"]
    started, image, mosaic = time.perf_counter(), None, None
    try:
        with rasterio.Env(GDAL_CACHEMAX=job["cache_mb"]):
            image = open_geotiff(job["s2_path"], expected_bands=4)
            mosaic = worldcover.LabelMosaic(image, job["map_paths"])
            low_high = tile_percentiles(image, job, settings)
            tables = scaling_tables(settings["scaling"], settings["max_reflectance"], low_high)
            done = read_journal(journal_path)
            if journal_path.exists() and not journal_path.read_bytes().endswith(b"\n"):
                with open(journal_path, "ab") as journal:
                    journal.write(b"\n")  # end a line cut short so the next record starts cleanly
            for folder in folders.values():
                folder.mkdir(parents=True, exist_ok=True)
                for leftover in folder.glob(f".{tile}_*.tmp"):  # from a run killed mid-write
                    leftover.unlink(missing_ok=True)
            new_patches = 0
            with open(journal_path, "a") as journal:
                for row, col, window in patch_windows(image.height, image.width, size, stride):
                    name = f"{tile}_{row:03d}_{col:03d}"
                    if patch_done(done.get(name), folders, extension):
                        continue
                    new_patches += 1
                    pixels = read_window(image, window, path=job["s2_path"])
                    labels = mosaic.read(window)
                    # Code histogram (exact in float32 up to 2**24 pixels): filters, checks, fractions.
                    codes = cv2.calcHist([labels], [0], None, [256], [0, 256]).ravel().astype(np.int64)
                    if codes[classes.UNKNOWN_CODES].any():
                        raise mosaic.unknown_code_error(labels, window, name)
                    status = patch_status(codes, pixels, image.nodata, settings["max_water_fraction"])
                    if status == "kept":
                        write_patch(folders, name, extension, pixels, labels, settings, tables, image, window)
                    record = {
                        "name": name,
                        "row": row,
                        "col": col,
                        "status": status,
                        "codes": {str(c): int(codes[c]) for c in np.flatnonzero(codes)},
                    }
                    journal.write(json.dumps(record) + "\n")  # buffered: a lost line only redoes a patch
        return {
            "tile": tile,
            "ok": True,
            "seconds": time.perf_counter() - started,
            "new_patches": new_patches,
            "percentiles": None if low_high is None else [v.tolist() for v in low_high],
        }
    except InputError as error:
        remove_tile_outputs(journal_path, folders, extension)
        return {**worldcover.failure(tile, error.path, error.problem, error.expected), "ok": False}
    finally:
        if mosaic is not None:
            mosaic.close()
        if image is not None:
            image.close()


def write_patch(folders, name, extension, pixels, labels, settings, tables, image, window):
    scaled = scale_to_uint8(pixels, settings["scaling"], settings["bands"], tables)
    if extension == ".png":
        write_file(folders["images"], f"{name}.png", cv2.imencode(".png", scaled)[1])
    else:
        rgb_first = scaled[..., [2, 1, 0] + ([3] if scaled.shape[-1] == 4 else [])]
        write_geotiff(
            folders["images"] / f"{name}.tif",
            np.moveaxis(rgb_first, -1, 0),
            transform=image.transform @ rasterio.Affine.translation(window.col_off, window.row_off),
            crs=image.crs,
        )
    mask = cv2.LUT(cv2.merge([labels, labels, labels]), classes.CODE_TO_BGR)
    write_file(folders["masks"], f"{name}.png", cv2.imencode(".png", mask)[1])


# ---- per-tile journals: what a re-run skips ----


def read_journal(path) -> dict:
    """Finished-patch records of one tile; a line cut short by an interrupted run is ignored."""
    records = {}
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["name"]] = record
    return records


def patch_done(record, folders, extension) -> bool:
    """A journal record whose patch needs no work: dropped, or kept with both files in place."""
    if record is None:
        return False
    return record["status"] != "kept" or all(
        (folders[kind] / f"{record['name']}{ext}").exists()
        for kind, ext in (("images", extension), ("masks", ".png"))
    )


def remove_tile_outputs(journal_path, folders, extension) -> None:
    """Delete a failed tile's patch files and journal, so the dataset never holds half a tile."""
    for record in read_journal(journal_path).values():
        for kind, ext in (("images", extension), ("masks", ".png")):
            (folders[kind] / f"{record['name']}{ext}").unlink(missing_ok=True)
    Path(journal_path).unlink(missing_ok=True)


# ---- splits and shards ----


def split_names(names, ratios, seed) -> dict:
    """Seeded split of tile ids (or patch names) into train/val/test.

    A seeded shuffle of the sorted names, then at least one name per split with a ratio > 0 (train
    first, then val, then test, while names last), the rest by largest shortfall from the ratios.
    """
    if ratios is None:
        return {name: None for name in names}
    order = sorted(names)
    random.Random(seed).shuffle(order)
    counts = [0, 0, 0]
    for index in range(3):
        if ratios[index] > 0 and sum(counts) < len(order):
            counts[index] = 1
    while sum(counts) < len(order):
        shortfall = [len(order) * ratios[i] - counts[i] for i in range(3)]
        counts[int(np.argmax(shortfall))] += 1
    splits = [split for split, count in zip(patches.SPLITS, counts, strict=True) for _ in range(count)]
    return dict(zip(order, splits, strict=True))


def parse_split(text):
    """--split: None for 'none', else train,val,test ratios normalised to sum 1."""
    if text.lower() == "none":
        return None
    try:
        ratios = [float(v) for v in text.split(",")]
    except ValueError:
        ratios = []
    require(
        len(ratios) == 3 and min(ratios) >= 0 and sum(ratios) > 0 and ratios[0] > 0,
        "--split",
        f"got {text!r}",
        "three non-negative train,val,test ratios with train > 0, e.g. 0.8,0.1,0.1, or none",
    )
    return [r / sum(ratios) for r in ratios]


def check_tile_level(tile_count, ratios, level) -> None:
    """A split by tile needs a tile for every split with a ratio > 0; small inputs say --split_level patch."""
    wanted = sum(ratio > 0 for ratio in ratios or ())
    require(
        level != "tile" or tile_count >= wanted,
        "--split",
        f"{tile_count} tile(s) cannot fill {wanted} splits by tile",
        f"at least {wanted} tiles, or --split_level patch (patches of one tile then share splits)",
    )


def shard_dir(out, index, count) -> Path:
    return Path(out) / "shards" / f"{index}_of_{count}"


def shard_tiles(tiles, failures, index, count):
    """Shard K of N: every N-th tile in id order from the K-th (failures without a tile id: shard 1)."""
    mine = set(sorted(tiles)[index - 1 :: count])
    tiles = {tile: info for tile, info in tiles.items() if tile in mine}
    failures = [f for f in failures if f["tile"] in mine or (f["tile"] is None and index == 1)]
    return tiles, failures


def check_state(out, settings, overwrite) -> bool:
    """Never mix into a folder built with other settings; True when continuing one with the same."""
    state_path = out / ".progress" / "state.json"
    if state_path.exists() and overwrite:
        names = (*patches.SPLITS, "images", "masks", ".progress", "class_percentages", "shards")
        for name in (*names, "manifest.csv", "report.json", "config.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    continuing = state_path.exists()
    if continuing:  # what an atomic write killed mid-way left behind
        runs.remove_stale_temporaries(out)
    runs.check_same_settings(
        state_path,
        settings,
        what="this dataset folder's patches",
        hint="the same settings to continue it, --overwrite to rebuild it, or another --out",
    )
    atomic.write_json(state_path, settings)
    return continuing


def remove_empty_build(out) -> None:
    """A new build whose first tile failed: remove its state record and empty folders (nothing to keep)."""
    progress = out / ".progress"
    if progress.is_dir() and not any(progress.glob("*.jsonl")):
        (progress / "state.json").unlink(missing_ok=True)
    for folder in sorted((p for p in [out, *out.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()


# ---- placing patch files into split folders ----


def move_patches(out, targets, sources, extension) -> None:
    """Move each patch's image and mask into `<out>/<split>/` (`<out>/` for None) from any source base.

    `targets` maps patch names to splits. Renames only: files already in place are left alone.
    """
    for name, split in targets.items():
        base = out / split if split else out
        for kind, ext in (("images", extension), ("masks", ".png")):
            target = base / kind / f"{name}{ext}"
            if target.exists():
                continue
            source = next(
                (s / kind / target.name for s in sources if (s / kind / target.name).exists()), None
            )
            if source is None:
                raise InputError(
                    target, "is missing (its journal says kept)", "the patch file, or --overwrite"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)


def kept_names(out, tiles) -> list:
    """Names of the kept patches recorded in the tiles' journals."""
    return sorted(
        name
        for tile in tiles
        for name, record in read_journal(out / ".progress" / f"{tile}.jsonl").items()
        if record["status"] == "kept"
    )


def unsplit(out, tiles, extension) -> None:
    """Patch level, continuing a build: bring kept patches back to the flat folders (re-split at the end)."""
    sources = [out / split for split in patches.SPLITS]
    move_patches(out, dict.fromkeys(kept_names(out, tiles)), sources, extension)


# ---- manifest, report, class percentages ----


def manifest_row(record, tile, info, split, settings, codes) -> dict:
    """One manifest.csv row: name, split, grid place, bounds, CRS and the 7 class fractions."""
    import rasterio

    class_pixels = np.bincount(
        classes.CODE_TO_CLASS[np.flatnonzero(codes)], weights=codes[codes > 0], minlength=classes.NUM_CLASSES
    )
    transform = rasterio.Affine(*info["transform"])
    size, stride = settings["patch_size"], settings["stride"]
    top, left = record["row"] * stride, record["col"] * stride
    x0, y0 = transform @ (left, top)
    x1, y1 = transform @ (left + size, top + size)
    row = {
        "patch": f"{record['name']}.{settings['image_format']}",
        "split": split or "",
        "tile": tile,
        "row": record["row"],
        "col": record["col"],
        "left": min(x0, x1),
        "bottom": min(y0, y1),
        "right": max(x0, x1),
        "top": max(y0, y1),
        "crs": info["crs"],
    }
    row.update(
        {
            f"frac_{name}": round(float(class_pixels[i]) / codes.sum(), 6)
            for i, name in enumerate(classes.CLASS_KEYS)
        }
    )
    row["_class_pixels"] = class_pixels.astype(np.int64)  # for the class-percentage tables, not a column
    return row


def collect_journals(out, tiles, failed, split_of, settings):
    """Manifest rows, per-tile summaries and code histograms (before / after filtering) from the journals.

    `split_of` maps tile ids (tile level) or patch names (patch level) to splits.
    """
    rows, per_tile = [], {}
    before, after = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for tile in sorted(set(tiles) - failed):
        info = tiles[tile]
        summary = {
            "split": split_of.get(tile),
            "s2_file": info["s2_path"],
            "map_files": info["map_paths"],
            "patches": 0,
            "kept": 0,
            "dropped": dict.fromkeys(DROP_REASONS, 0),
            "percentiles": info.get("percentiles"),
        }
        journal = read_journal(out / ".progress" / f"{tile}.jsonl")
        for record in sorted(journal.values(), key=lambda r: r["name"]):
            codes = np.zeros(256, np.int64)
            for code, count in record["codes"].items():
                codes[int(code)] = count
            before += codes
            summary["patches"] += 1
            if record["status"] != "kept":
                summary["dropped"][record["status"]] += 1
                continue
            summary["kept"] += 1
            after += codes
            split = split_of.get(tile, split_of.get(record["name"]))
            rows.append(manifest_row(record, tile, info, split, settings, codes))
        per_tile[tile] = summary
    return rows, per_tile, before, after


def write_split_percentages(out, rows) -> None:
    """`class_percentages/<split>.csv` (`all.csv` when flat) from the manifest's class fractions.

    The same table `percentages.write_class_percentages` makes by decoding the masks (a test compares
    them), taken from the journals' pixel counts instead: decoding every mask again would add about
    a fifth to the build time.
    """
    for split in sorted({row["split"] for row in rows}):
        table = []
        for row in sorted((r for r in rows if r["split"] == split), key=lambda r: r["patch"]):
            counts = row.pop("_class_pixels")
            total = max(int(counts.sum()), 1)
            shares = {
                n: round(100.0 * int(c) / total, 2) for n, c in zip(classes.CLASS_NAMES, counts, strict=True)
            }
            table.append({"filename": Path(row["patch"]).stem + ".png", **shares})
        atomic.write_csv(percentages.csv_path(out, split or "all"), table, percentages.COLUMNS)


def finish_build(out, tiles, failures, settings, level, started) -> dict:
    """Split, place files, write manifest.csv, report.json, tiles.json and the class percentages.

    Tile level: `settings["split_ratios"]` over the tile ids (files are already in their split
    folders); patch level: over the kept patch names, files moved there from the flat folders;
    no ratios (--split none, or a shard): flat. Returns the report.
    """
    ratios, seed, extension = settings["split_ratios"], settings["seed"], "." + settings["image_format"]
    failed = {f["tile"] for f in failures}
    split_of = split_names(list(tiles), ratios if level == "tile" else None, seed)
    if level == "patch" and ratios:
        split_of = split_names(kept_names(out, set(tiles) - failed), ratios, seed)
        move_patches(out, split_of, [out], extension)
    rows, per_tile, before, after = collect_journals(out, tiles, failed, split_of, settings)
    write_split_percentages(out, rows)
    atomic.write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)
    totals = {
        "tiles": len(tiles),
        "tiles_failed": len(failed),
        "patches": sum(s["patches"] for s in per_tile.values()),
        "kept": len(rows),
        "kept_by_split": {s: sum(r["split"] == s for r in rows) for s in patches.SPLITS} if ratios else None,
        "dropped": {r: sum(s["dropped"][r] for s in per_tile.values()) for r in DROP_REASONS},
    }
    class_pixels = np.bincount(
        classes.CODE_TO_CLASS[np.flatnonzero(after)], weights=after[after > 0], minlength=7
    )
    tiles_by_split = {s: sorted(t for t in tiles if split_of.get(t) == s) for s in patches.SPLITS}
    split = {"level": level if ratios else None, "ratios": ratios, "seed": seed}
    split["tiles"] = tiles_by_split if ratios and level == "tile" else None
    split["note"] = PATCH_LEVEL_NOTE if ratios and level == "patch" else None
    report = {
        "totals": totals,
        "tiles": per_tile,
        "failures": sorted(failures, key=lambda f: (f["tile"] or "", f["file"])),
        "split": split,
        "code_pixels_before_filtering": {str(c): int(before[c]) for c in np.flatnonzero(before)},
        "code_pixels_after_filtering": {str(c): int(after[c]) for c in np.flatnonzero(after)},
        "class_pixels_after_filtering": {
            name: int(class_pixels[i]) for i, name in enumerate(classes.CLASS_KEYS)
        },
        "remapped_pixels_after_filtering": {classes.REMAP_NAMES[c]: int(after[c]) for c in classes.REMAP},
        "palette": {name: classes.PALETTE[i].tolist() for i, name in enumerate(classes.CLASS_KEYS)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    record = {"tiles": {tile: tiles[tile] for tile in sorted(tiles)}, "failures": report["failures"]}
    atomic.write_json(out / ".progress" / "tiles.json", record)
    atomic.write_json(out / "report.json", report)
    return report


def summary_line(report) -> str:
    """The last line printed: the numbers of report.json["totals"]."""
    totals = report["totals"]
    dropped = ", ".join(f"{reason} {count}" for reason, count in totals["dropped"].items())
    by_split = ""
    if totals["kept_by_split"]:
        by_split = " (" + ", ".join(f"{s} {n}" for s, n in totals["kept_by_split"].items()) + ")"
        by_split += ", split by patch" if report["split"]["level"] == "patch" else ""
    return (
        f"summary: tiles {totals['tiles']} (failed {totals['tiles_failed']}), patches {totals['patches']}, "
        f"kept {totals['kept']}{by_split}, dropped {dropped}, {report['seconds']:.1f} s"
    )


# ---- merging shards ----


def read_shards(out):
    """The finished shards under `<out>/shards/`: their folders, common settings, tiles and failures."""
    root = require_dir(Path(out) / "shards", "the shards' folder (run --shard K/N first)")
    folders = sorted(root.glob("*_of_*"), key=lambda p: int(p.name.split("_")[0]))
    require(folders, root, "holds no K_of_N shard folder", "the output of dataset_creator.py --shard K/N")
    count = int(folders[0].name.split("_of_")[1])
    expected = [shard_dir(out, k, count) for k in range(1, count + 1)]
    for folder in expected:
        require(
            (folder / "report.json").exists(),
            folder,
            "is missing or unfinished (no report.json)",
            f"all {count} shards finished before --merge",
        )
    require(folders == expected, root, "holds shards of several counts N", "one --shard K/N series")
    settings, tiles, failures = None, {}, []
    for folder in expected:
        state = json.loads((folder / ".progress" / "state.json").read_text())
        common = {k: v for k, v in state.items() if k not in ("shard", "tiles")}
        require(
            settings is None or common == settings,
            folder,
            "was built with other settings than shard 1",
            "shards made by one command line that differs only in --shard",
        )
        settings = common
        record = json.loads((folder / ".progress" / "tiles.json").read_text())
        tiles.update(record["tiles"])
        failures += record["failures"]
    return expected, settings, tiles, failures


def merge_shards(out, overwrite, keep_going, started) -> dict:
    """--merge: join the shards' journals and tile records and finish the build as one run would."""
    out = Path(out)
    folders, settings, tiles, failures = read_shards(out)
    raise_first_failure(failures, keep_going)
    merged = {**settings, "shard": None, "tiles": sorted(tiles)}
    check_state(out, merged, overwrite)
    for tile in sorted(tiles):
        for folder in folders:
            journal = folder / ".progress" / f"{tile}.jsonl"
            if journal.exists():
                atomic.write_bytes(out / ".progress" / journal.name, journal.read_bytes())
    level, extension = settings["split_level"], "." + settings["image_format"]
    ratios, failed = settings["split_ratios"], {f["tile"] for f in failures}
    if level == "tile":
        split_of = split_names(list(tiles), ratios, settings["seed"])
        names = kept_names(out, set(tiles) - failed)
        move_patches(out, {name: split_of[name[: name.index("_")]] for name in names}, folders, extension)
    else:  # patch level (or --split none): flat first, finish_build splits by patch
        move_patches(out, dict.fromkeys(kept_names(out, set(tiles) - failed)), folders, extension)
    return finish_build(out, tiles, failures, merged, level, started)


# ---- main's steps ----


def tile_jobs(args, out, tiles, failures, split_of, settings):
    """One job per tile that passed its checks, writing into its split's folders (flat if none yet)."""
    failed = {f["tile"] for f in failures}
    jobs = []
    for tile in sorted(set(tiles) - failed):
        base = out / split_of[tile] if split_of[tile] else out
        jobs.append(
            {
                "tile": tile,
                "s2_path": tiles[tile]["s2_path"],
                "map_paths": tiles[tile]["map_paths"],
                "folders": {kind: str(base / kind) for kind in ("images", "masks")},
                "settings": settings,
                "journal": str(out / ".progress" / f"{tile}.jsonl"),
                "cache_mb": args.cache_mb,
            }
        )
    return jobs


def tile_grids(args, tiles):
    """(patch rows, patch columns) of every tile whose size is known."""
    return {
        tile: (
            len(range(0, info["height"] - args.patch_size + 1, args.stride)),
            len(range(0, info["width"] - args.patch_size + 1, args.stride)),
        )
        for tile, info in tiles.items()
        if "width" in info
    }


def process_tiles(args, jobs, tiles, failures):
    """Run the tile jobs on --workers processes, in tile order; stop at the first failure unless
    --keep_going. Each tile prints one line as it finishes."""
    grid = tile_grids(args, tiles)
    bar = progress.bar(total=len(jobs), desc="tiles", enabled=args.progress, unit="tile")

    def report_result(job, result):
        bar.update()
        if result["ok"]:
            total, new = grid[result["tile"]][0] * grid[result["tile"]][1], result["new_patches"]
            print(
                f"tile {result['tile']}: {new} patches in {result['seconds']:.1f} s "
                f"({new / max(result['seconds'], 1e-9):.1f} patches/s), {total - new} done before",
                flush=True,
            )
            tiles[result["tile"]]["percentiles"] = result["percentiles"]
        else:
            failures.append({key: value for key, value in result.items() if key != "ok"})
            print(f"tile {result['tile']} failed: {result['file']}: {result['problem']}", flush=True)

    def stop():
        return bool(failures) and not args.keep_going

    with bar:
        parallel.run_jobs(process_tile, jobs, args.workers, on_result=report_result, in_order=True, stop=stop)
    raise_first_failure(failures, args.keep_going)


def raise_first_failure(failures, keep_going):
    if failures and not keep_going:
        first = failures[0]
        raise InputError(first["file"], first["problem"], first["expected"])


def check_arguments(args):
    """Derived values and the checks every mode shares; returns the split ratios."""
    if "stride" not in cli.typed_flags(args):
        args.stride = args.patch_size  # no overlap, as in the paper, also for another --patch_size
    require(
        args.patch_size > 0 and args.stride > 0, "--patch_size/--stride", "must be positive", "pixels > 0"
    )
    water = args.max_water_fraction
    require(0 <= water <= 1, "--max_water_fraction", f"got {water}", "a fraction in [0, 1]")
    require(args.workers >= 1, "--workers", f"got {args.workers}", "at least 1")
    require(
        0 < args.max_reflectance <= 1,
        "--max_reflectance",
        f"got {args.max_reflectance}",
        "a reflectance in (0, 1]",
    )
    low, high = args.percentiles
    require(
        0 <= low < high <= 100,
        "--percentiles",
        f"got {low} {high}",
        "two percentiles, 0 <= low < high <= 100",
    )
    require(
        1 <= args.percentile_windows <= 4096,
        "--percentile_windows",
        f"got {args.percentile_windows}",
        "1 to 4096 windows per tile",
    )
    require(1 <= args.cache_mb <= 1 << 20, "--cache_mb", f"got {args.cache_mb}", "1 to 1048576 MB")
    require(not (args.merge and args.shard), "--merge", "was given with --shard", "one of them")
    return parse_split(args.split)


def write_folder_percentages(args):
    """--percentages MASK_DIR: its class-percentage CSV (default <root>/class_percentages/<split>.csv)."""
    masks = Path(args.percentages)
    csv_path = args.out or percentages.csv_path(masks.parent.parent, masks.parent.name)
    path = percentages.write_class_percentages(masks, csv_path, args.workers)
    print(f"wrote {path}")
    return path


@cli_entry
def main(args):
    # A file without georeferencing is reported by our own checks as one line; GDAL's warning would
    # only precede that line with a traceback-like note.
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    started = time.perf_counter()
    if args.percentages:
        return write_folder_percentages(args)
    out = Path(
        args.out
        or Path(args.results_dir)
        / "dataset_creator"
        / (args.run_name or ("demo" if args.demo else "ARAS400k"))
    )
    if args.demo:
        args.s2_dir, args.map_dir = demo_data.write_demo_tiles(
            cli.demo_data_dir(args, "dataset_creator"), args.demo_size, args.seed
        )
    ratios, shard = check_arguments(args), parallel.parse_shard(args.shard)
    runs.print_args(args)
    if args.merge:
        report = merge_shards(out, args.overwrite, args.keep_going, started)
        runs.write_config(out, args, settings=json.loads((out / ".progress" / "state.json").read_text()))
        print(summary_line(report))
        return report

    # ---- find tiles ----
    tiles, maps, failures = worldcover.find_tiles(args.s2_dir, args.map_dir)
    raise_first_failure(failures, args.keep_going)
    check_tile_level(len(tiles), ratios, args.split_level)
    if shard:  # a shard's patches stay flat: --merge splits them as one run would
        tiles, failures = shard_tiles(tiles, failures, *shard)
        out = shard_dir(out, *shard)

    small = [(tile, tiles[tile]) for tile, grid in tile_grids(args, tiles).items() if 0 in grid]
    if small:
        tile, info = small[0]
        raise InputError(
            tile,
            f"is {info['height']} x {info['width']} pixels, smaller than --patch_size {args.patch_size}",
            "a --patch_size that fits the tiles",
        )

    # ---- split ----
    by_tile = ratios if args.split_level == "tile" and not shard else None
    split_of = split_names(list(tiles), by_tile, args.seed)
    settings = {
        **runs.settings_of(args, RESUME_SETTINGS),
        "percentiles": list(args.percentiles),
        "split_ratios": ratios,
        "shard": args.shard or None,
        "tiles": sorted(tiles),
    }
    continuing = check_state(out, settings, args.overwrite)
    if args.split_level == "patch" and continuing:
        unsplit(out, tiles, "." + args.image_format)
    jobs = tile_jobs(args, out, tiles, failures, split_of, settings)

    # ---- process tiles ----
    patches_per_tile = sorted({r * c for r, c in tile_grids(args, tiles).values()})
    print(
        f"tiles: {len(tiles)} paired, {len(failures)} failed checks, {len(maps)} map tiles; patches per "
        f"tile {patches_per_tile}; output {out}" + (" (continuing an earlier build)" if continuing else "")
    )
    try:
        process_tiles(args, jobs, tiles, failures)
    except InputError:
        if not continuing:
            remove_empty_build(out)
        raise

    # ---- split, manifest, report, class percentages ----
    level = args.split_level if not shard else "tile"
    settings_for_split = {**settings, "split_ratios": None} if shard else settings
    report = finish_build(out, tiles, failures, settings_for_split, level, started)
    runs.write_config(out, args, settings=settings, out=str(out))
    print(summary_line(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
