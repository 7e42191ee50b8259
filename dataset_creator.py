"""ARAS400k dataset creation: Sentinel-2 RGBNIR composites + WorldCover maps -> 256 px PNG pairs.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k), arXiv 2603.09625. This script rebuilds the 100k real patches of the dataset: each
ESA WorldCover 2021 S2 RGBNIR composite tile is cut into 256 x 256 patches from its top-left corner,
the WorldCover map is resampled onto each patch's exact pixel grid (`common/aras400k.py`), the 11
codes are remapped to the paper's 7 classes, patches with no-data or more than 90 % water are
dropped, and the rest are written as RGB PNGs with colour-coded masks, a manifest, a report of the
drops, and a spatial split by tile (README "dataset_creator.py") in segmentation_train.py's layout.

Commands:
    python dataset_creator.py --demo
    python dataset_creator.py --s2_dir S2RGB_2021 --map_dir worldcover_2021 --out ARAS400k --workers 2

Runtime: the demo takes a few seconds on a laptop CPU; a full 10980 x 10980 tile (1764 patches) takes
15-20 CPU seconds per worker and about 120 MB of memory (bench/dataset_creator_speed.py). It prints
one line per tile, then a summary with the numbers of report.json["totals"]:
    summary: tiles 2 (failed 0), patches 18, kept 14 (train 6, val 8, test 0), dropped label_nodata 1, ...
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

from common import aras400k, atomic, cli, parallel, runs
from common.aras400k import CLASS_KEYS, CODE_TO_BGR, CODE_TO_CLASS, PALETTE, REMAP, REMAP_NAMES, SPLITS
from common.errors import InputError, cli_entry, require
from common.raster import open_geotiff, patch_windows, read_window, write_geotiff

DROP_REASONS = ("label_nodata", "image_nodata", "water")
# The settings a dataset folder is built with: a re-run continues it only with the same ones.
SAME_SETTINGS = (
    "patch_size stride max_water_fraction scaling max_reflectance percentile_windows bands image_format seed"
).split()


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
    add(
        "--split", default="0.8,0.1,0.1", help="train,val,test ratios of the split BY TILE, or 'none' (flat)."
    )
    cli.add_workers_argument(parser, what="one tile each")
    add(
        "--keep_going", action="store_true", help="Process the other tiles when one is bad (see report.json)."
    )
    add("--cache_mb", type=int, default=256, help="GDAL block cache per worker in MB.")
    cli.add_demo_argument(parser, "(two small GeoTIFF pairs, a few seconds).")
    add("--demo_size", type=int, default=768, help=argparse.SUPPRESS)
    cli.add_run_arguments(parser, resume=False)
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
    integers as floor(DN * 255 / max).
    """
    order = [2, 1, 0] if bands == "rgb" else [2, 1, 0, 3]
    if scaling == "patch_max":
        peak = max(int(image[: len(order)].max()), 1)
        return (cv2.merge([image[band] for band in order]).astype(np.uint32) * 255 // peak).astype(np.uint8)
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


def read_journal(path):
    """Finished-patch records of one tile; a line cut short by an interrupted run is ignored."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["name"]] = record
    return records


def patch_done(record, folders, extension):
    """A journal record whose patch needs no work: dropped, or kept with both files in place."""
    if record is None:
        return False
    return record["status"] != "kept" or all(
        (folders[kind] / f"{record['name']}{ext}").exists()
        for kind, ext in (("images", extension), ("masks", ".png"))
    )


def patch_status(codes, pixels, nodata, max_water_fraction):
    """The paper's filters, first matching reason counted: no label, no image data, mostly water."""
    if codes[0]:
        return "label_nodata"
    if not pixels.any(axis=0).all() or (nodata is not None and (pixels == nodata).all(axis=0).any()):
        return "image_nodata"
    if codes[aras400k.WATER_CODE] > max_water_fraction * codes.sum():
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
            mosaic = aras400k.LabelMosaic(image, job["map_paths"])
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
                    if codes[aras400k.UNKNOWN_CODES].any():
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
        return {**aras400k.failure(tile, error.path, error.problem, error.expected), "ok": False}
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
    mask = cv2.LUT(cv2.merge([labels, labels, labels]), CODE_TO_BGR)
    write_file(folders["masks"], f"{name}.png", cv2.imencode(".png", mask)[1])


def remove_tile_outputs(journal_path, folders, extension):
    for record in read_journal(journal_path).values():
        for kind, ext in (("images", extension), ("masks", ".png")):
            (folders[kind] / f"{record['name']}{ext}").unlink(missing_ok=True)
    journal_path.unlink(missing_ok=True)


# ---- inputs, split, resume ----


def split_tiles(tiles, ratios, seed):
    """Spatial split BY TILE: a seeded shuffle, then at least one tile per split with a ratio > 0
    (train first, then val, then test, while tiles last), the rest by largest shortfall."""
    if ratios is None:
        return {tile: None for tile in tiles}
    order = sorted(tiles)
    random.Random(seed).shuffle(order)
    counts = [0, 0, 0]
    for index in range(3):
        if ratios[index] > 0 and sum(counts) < len(order):
            counts[index] = 1
    while sum(counts) < len(order):
        shortfall = [len(order) * ratios[i] - counts[i] for i in range(3)]
        counts[int(np.argmax(shortfall))] += 1
    names = [split for split, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    return dict(zip(order, names, strict=True))


def parse_split(text):
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


def check_state(out, settings, overwrite):
    """Never mix into a folder built with other settings; True when continuing one with the same."""
    state_path = out / ".progress" / "state.json"
    if state_path.exists() and overwrite:
        for name in (*SPLITS, "images", "masks", ".progress", "manifest.csv", "report.json", "config.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    continuing = state_path.exists()
    runs.check_same_settings(
        state_path,
        settings,
        what="this dataset folder's patches",
        hint="the same settings to continue it, --overwrite to rebuild it, or another --out",
    )
    atomic.write_json(state_path, settings)
    return continuing


# ---- main's steps ----


def tile_jobs(args, out, tiles, maps, failures, split_of, settings):
    """One job per tile that passed its checks; records each tile's split and map files."""
    failed = {f["tile"] for f in failures}
    jobs = []
    for tile in sorted(set(tiles) - failed):
        info = tiles[tile]
        base = out / split_of[tile] if split_of[tile] else out
        jobs.append(
            {
                "tile": tile,
                "s2_path": info["s2_path"],
                "map_paths": aras400k.overlapping_maps(info, maps),
                "folders": {kind: str(base / kind) for kind in ("images", "masks")},
                "settings": settings,
                "journal": str(out / ".progress" / f"{tile}.jsonl"),
                "cache_mb": args.cache_mb,
            }
        )
        info.update(split=split_of[tile], map_files=jobs[-1]["map_paths"])
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

    def report_result(job, result):
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

    parallel.run_jobs(process_tile, jobs, args.workers, on_result=report_result, in_order=True, stop=stop)
    raise_first_failure(failures, args.keep_going)


def raise_first_failure(failures, keep_going):
    if failures and not keep_going:
        first = failures[0]
        raise InputError(first["file"], first["problem"], first["expected"])


def manifest_row(record, tile, info, args, codes):
    """One manifest.csv row: name, split, grid place, bounds, CRS and the 7 class fractions."""
    classes = np.bincount(CODE_TO_CLASS[np.flatnonzero(codes)], weights=codes[codes > 0], minlength=7)
    transform = rasterio.Affine(*info["transform"])
    top, left = record["row"] * args.stride, record["col"] * args.stride
    x0, y0 = transform @ (left, top)
    x1, y1 = transform @ (left + args.patch_size, top + args.patch_size)
    row = {
        "patch": f"{record['name']}.{args.image_format}",
        "split": info["split"] or "",
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
        {f"frac_{name}": round(float(classes[i]) / codes.sum(), 6) for i, name in enumerate(CLASS_KEYS)}
    )
    return row


def collect_journals(args, out, tiles, failed):
    """Manifest rows, per-tile summaries and code histograms (before / after filtering) from the journals."""
    rows, per_tile = [], {}
    before, after = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for tile in sorted(set(tiles) - failed):
        info = tiles[tile]
        summary = {
            "split": info["split"],
            "s2_file": info["s2_path"],
            "map_files": info["map_files"],
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
            rows.append(manifest_row(record, tile, info, args, codes))
        per_tile[tile] = summary
    return rows, per_tile, before, after


def write_manifest_and_report(args, out, tiles, failures, split_of, ratios, started):
    """manifest.csv and report.json from the tiles' journals; returns the report."""
    failed = {f["tile"] for f in failures}
    rows, per_tile, before, after = collect_journals(args, out, tiles, failed)
    fieldnames = ["patch", "split", "tile", "row", "col", "left", "bottom", "right", "top", "crs"]
    atomic.write_csv(out / "manifest.csv", rows, fieldnames + [f"frac_{name}" for name in CLASS_KEYS])
    kept_by_split = {
        split: sum(s["kept"] for s in per_tile.values() if s["split"] == split) for split in SPLITS
    }
    totals = {
        "tiles": len(tiles),
        "tiles_failed": len(failed),
        "patches": sum(s["patches"] for s in per_tile.values()),
        "kept": len(rows),
        "kept_by_split": kept_by_split if ratios else None,
        "dropped": {r: sum(s["dropped"][r] for s in per_tile.values()) for r in DROP_REASONS},
    }
    class_pixels = np.bincount(CODE_TO_CLASS[np.flatnonzero(after)], weights=after[after > 0], minlength=7)
    split_tiles_by_name = {s: sorted(t for t, v in split_of.items() if v == s) for s in SPLITS}
    report = {
        "totals": totals,
        "tiles": per_tile,
        "failures": failures,
        "split": {"ratios": ratios, "seed": args.seed, "tiles": split_tiles_by_name if ratios else None},
        "code_pixels_before_filtering": {str(c): int(before[c]) for c in np.flatnonzero(before)},
        "code_pixels_after_filtering": {str(c): int(after[c]) for c in np.flatnonzero(after)},
        "class_pixels_after_filtering": {name: int(class_pixels[i]) for i, name in enumerate(CLASS_KEYS)},
        "remapped_pixels_after_filtering": {REMAP_NAMES[c]: int(after[c]) for c in REMAP},
        "palette": {name: PALETTE[i].tolist() for i, name in enumerate(CLASS_KEYS)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic.write_json(out / "report.json", report)
    return report


def summary_line(report, ratios):
    """The last line printed: the numbers of report.json["totals"]."""
    totals = report["totals"]
    dropped = ", ".join(f"{reason} {count}" for reason, count in totals["dropped"].items())
    by_split = ""
    if ratios:
        by_split = " (" + ", ".join(f"{s} {n}" for s, n in totals["kept_by_split"].items()) + ")"
    return (
        f"summary: tiles {totals['tiles']} (failed {totals['tiles_failed']}), patches {totals['patches']}, "
        f"kept {totals['kept']}{by_split}, dropped {dropped}, {report['seconds']:.1f} s"
    )


@cli_entry
def main(args):
    # A file without georeferencing is reported by our own checks as one line; GDAL's warning would
    # only precede that line with a traceback-like note.
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    started = time.perf_counter()
    out = Path(
        args.out
        or Path(args.results_dir)
        / "dataset_creator"
        / (args.run_name or ("demo" if args.demo else "ARAS400k"))
    )
    if args.demo:
        args.s2_dir, args.map_dir = aras400k.write_demo_tiles(
            cli.demo_data_dir(args, "dataset_creator"), args.demo_size, args.seed
        )
    if "stride" not in cli.typed_flags(args):
        args.stride = args.patch_size  # no overlap, as in the paper, also for another --patch_size
    require(
        args.patch_size > 0 and args.stride > 0, "--patch_size/--stride", "must be positive", "pixels > 0"
    )
    water = args.max_water_fraction
    require(0 <= water <= 1, "--max_water_fraction", f"got {water}", "a fraction in [0, 1]")
    require(args.workers >= 1, "--workers", f"got {args.workers}", "at least 1")
    ratios = parse_split(args.split)
    runs.print_args(args)

    # ---- find tiles ----
    tiles, maps, failures = aras400k.find_tiles(args.s2_dir, args.map_dir)
    raise_first_failure(failures, args.keep_going)

    # ---- split ----
    split_of = split_tiles(list(tiles), ratios, args.seed)
    settings = runs.settings_of(args, SAME_SETTINGS)
    settings.update(percentiles=list(args.percentiles), split_ratios=ratios, tiles=sorted(tiles))
    continuing = check_state(out, settings, args.overwrite)
    jobs = tile_jobs(args, out, tiles, maps, failures, split_of, settings)

    # ---- process tiles ----
    patches_per_tile = sorted({r * c for r, c in tile_grids(args, tiles).values()})
    print(
        f"tiles: {len(tiles)} paired, {len(failures)} failed checks, {len(maps)} map tiles; patches per "
        f"tile {patches_per_tile}; output {out}" + (" (continuing an earlier build)" if continuing else "")
    )
    process_tiles(args, jobs, tiles, failures)

    # ---- manifest and report ----
    report = write_manifest_and_report(args, out, tiles, failures, split_of, ratios, started)
    runs.write_config(out, args, settings=settings, out=str(out))
    print(summary_line(report, ratios))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
