"""ARAS400k dataset creation: Sentinel-2 RGBNIR composites + WorldCover maps -> 256 px PNG pairs.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k), arXiv 2603.09625. This script rebuilds the 100k real patches of the dataset:
the ESA WorldCover 2021 Sentinel-2 RGBNIR annual composite (4 bands, 10 m, uint16) is cut into
256 x 256 patches from each tile's top-left corner, the WorldCover 2021 land-cover map is resampled
onto each patch's exact pixel grid (nearest neighbour, from every map tile the patch overlaps, in any
CRS), the 11 WorldCover codes are remapped to the paper's 7 classes, patches with no-data or more
than 90 % water are dropped, and the survivors are written as RGB PNGs with colour-coded masks, a
manifest with per-patch class fractions, a report of what was dropped and why, and a spatial
train/val/test split by tile in the layout segmentation_train.py reads.

Commands:
    python dataset_creator.py --demo
    python dataset_creator.py --s2_dir S2RGB_2021 --map_dir worldcover_2021 --out ARAS400k --workers 2

Runtime: the demo takes a few seconds on a laptop CPU; a full 10980 x 10980 tile (1764 patches) takes
15-20 CPU seconds per worker and about 120 MB of memory (bench/dataset_creator_speed.py).
It should print one line per tile, then a summary such as
    summary: tiles 2 (failed 0), patches 18, kept 14 (train 6, val 8, test 0), dropped label_nodata 1, ...
with the same numbers as report.json["totals"].
"""

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from common.raster import open_geotiff, patch_windows, read_window, write_geotiff
from common import atomic, cli, runs
from common.errors import InputError, cli_entry, require, require_dir

# WorldCover 2021 codes (0 = no data) and the reference code's remap to the paper's 7 classes.
WORLDCOVER_CODES = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
REMAP = {90: 30, 100: 30, 95: 10, 70: 60}  # Wetland, Moss/lichen -> Grassland; Mangrove -> Tree; Snow -> Bare
REMAP_NAMES = {90: "90 Wetland -> 30 Grassland", 100: "100 Moss/lichen -> 30 Grassland",
               95: "95 Mangrove -> 10 Tree", 70: "70 Snow/ice -> 60 Bare/sparse"}
CLASS_NAMES = ("tree", "shrubland", "grassland", "cropland", "built_up", "bare_sparse", "water")
CLASS_CODES = (10, 20, 30, 40, 50, 60, 80)  # the WorldCover code of each class index after the remap
PALETTE = np.array([(0, 100, 0), (255, 182, 193), (154, 205, 50), (255, 215, 0), (139, 69, 19),
                    (211, 211, 211), (0, 0, 255)], dtype=np.uint8)  # RGB mask colour per class index
NODATA_CLASS, UNKNOWN_CLASS = 254, 255
CODE_TO_CLASS = np.full(256, UNKNOWN_CLASS, dtype=np.uint8)
CODE_TO_CLASS[0] = NODATA_CLASS
for _code in WORLDCOVER_CODES[1:]:
    CODE_TO_CLASS[_code] = CLASS_CODES.index(REMAP.get(_code, _code))
UNKNOWN_CODES = np.flatnonzero(CODE_TO_CLASS == UNKNOWN_CLASS)
# Mask colours looked up straight from the codes, in OpenCV's BGR order (one table look-up a patch).
CODE_TO_BGR = np.zeros((256, 1, 3), dtype=np.uint8)
for _code in WORLDCOVER_CODES[1:]:
    CODE_TO_BGR[_code, 0] = PALETTE[CODE_TO_CLASS[_code]][::-1]
DROP_REASONS = ("label_nodata", "image_nodata", "water")
SPLITS = ("train", "val", "test")
TILE_ID = re.compile(r"[NS]\d{2}[EW]\d{3}")
WATER_CODE = 80


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--s2_dir", default="S2RGB_2021",
                        help="Folder of WorldCover 2021 Sentinel-2 composites, *_S2RGBNIR.tif "
                             "(4 bands uint16).")
    parser.add_argument("--map_dir", default="worldcover_2021",
                        help="Folder of WorldCover 2021 maps, *_Map.tif (uint8 codes); neighbouring tiles "
                             "are used for patches that straddle a map tile boundary.")
    parser.add_argument("--out", default=None,
                        help="Output dataset folder (default <results_dir>/dataset_creator/<run_name>).")
    parser.add_argument("--patch_size", type=int, default=256, help="Patch side in pixels (paper: 256).")
    parser.add_argument("--stride", type=int, default=None,
                        help="Grid step in pixels (default = patch_size: no overlap, as in the paper).")
    parser.add_argument("--max_water_fraction", type=float, default=0.9,
                        help="Drop a patch whose water fraction exceeds this (reference: 0.9).")
    parser.add_argument("--scaling", choices=("patch_max", "fixed", "percentile"), default="patch_max",
                        help="8-bit scaling: patch_max = divide by the patch's own maximum (reference); "
                             "fixed = reflectance DN/10000 clipped to --max_reflectance (comparable "
                             "across patches); percentile = per-band 2-98 %% of a sample of the scene.")
    parser.add_argument("--max_reflectance", type=float, default=0.3,
                        help="Reflectance mapped to 255 by --scaling fixed.")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(2.0, 98.0),
                        help="Low and high percentiles for --scaling percentile.")
    parser.add_argument("--percentile_windows", type=int, default=64,
                        help="Random patch windows per tile sampled to estimate the percentiles.")
    parser.add_argument("--bands", choices=("rgb", "rgbnir"), default="rgb",
                        help="rgb = 3-band PNG (paper); rgbnir = 4 bands (PNG channel 4 holds NIR).")
    parser.add_argument("--image_format", choices=("png", "tif"), default="png",
                        help="png (paper) or a georeferenced 8-bit GeoTIFF per patch.")
    parser.add_argument("--split", default="0.8,0.1,0.1",
                        help="train,val,test ratios of the spatial split BY TILE (seeded by --seed), or "
                             "'none' for flat images/ and masks/ folders.")
    parser.add_argument("--workers", type=int, default=1, help="Processes working on tiles in parallel.")
    parser.add_argument("--keep_going", action="store_true",
                        help="Process the other tiles when one is bad; failures are listed in report.json.")
    parser.add_argument("--cache_mb", type=int, default=256,
                        help="GDAL block cache per worker in MB (bounds memory with compressed tiles).")
    parser.add_argument("--demo", action="store_true",
                        help="Generate two small GeoTIFF pairs under <results_dir>/demo_data/ and run "
                             "on them.")
    parser.add_argument("--demo_size", type=int, default=768, help=argparse.SUPPRESS)
    cli.add_run_arguments(parser)
    return parser


# ---- labels on the patch's pixel grid ----

def aligned_offset(image, label_map):
    """(row, col) offset of the image grid inside the map grid when nearest resampling is a pure shift.

    With the same CRS and pixel size, pixel centre c + 0.5 of the image falls in map pixel
    c + round(offset) for every c, so a plain windowed read IS the nearest-neighbour resampling.
    Returns None when the grids differ (another CRS, pixel size or rotation): then we warp.
    """
    a, b = image.transform, label_map.transform
    if image.crs != label_map.crs or a.b or a.d or b.b or b.d:
        return None
    drift = max(abs(a.a / b.a - 1), abs(a.e / b.e - 1)) * max(image.width, image.height)
    col, row = (a.c - b.c) / b.a, (a.f - b.f) / b.e
    if drift > 1e-6 or max(abs(col - round(col)), abs(row - round(row))) > 0.49:
        return None
    return int(round(row)), int(round(col))


class LabelMosaic:
    """WorldCover codes on the S2 tile's exact pixel grid, mosaicked from every overlapping map tile.

    The reference cropped one map tile by pixel index and stretched it, so patches at a map tile
    boundary got wrong labels. Here each patch reads its footprint from all map tiles it overlaps:
    by a shifted windowed read when the grids align (the release: both EPSG:4326, same pixel size),
    otherwise through a WarpedVRT onto the S2 grid with nearest resampling and an (in effect) exact
    transformer: GDAL's default approximation (0.125 px) moves labels near class edges.
    """

    def __init__(self, image, map_paths):
        self.image = image
        self.sources = []  # (path, dataset, offset or None, vrt or None, footprint window in S2 pixels)
        for path in map_paths:
            label_map = open_geotiff(path, expected_bands=1)
            require(label_map.dtypes[0] == "uint8", path, f"has dtype {label_map.dtypes[0]}",
                    "uint8 WorldCover codes")
            footprint = self._footprint(label_map)
            if footprint is None:
                label_map.close()
                continue
            offset = aligned_offset(image, label_map)
            vrt = None
            if offset is None:
                vrt = WarpedVRT(label_map, crs=image.crs, transform=image.transform, width=image.width,
                                height=image.height, resampling=Resampling.nearest, nodata=0,
                                src_nodata=label_map.nodata, tolerance=1e-9)
            self.sources.append((path, label_map, offset, vrt, footprint))

    def _footprint(self, label_map):
        """The map tile's extent as (row0, col0, row1, col1) in S2 pixels, or None if disjoint."""
        image = self.image
        bounds = transform_bounds(label_map.crs, image.crs, *label_map.bounds, densify_pts=21)
        window = from_bounds(*bounds, transform=image.transform)
        row0, col0 = int(np.floor(window.row_off)) - 1, int(np.floor(window.col_off)) - 1
        row1 = int(np.ceil(window.row_off + window.height)) + 1
        col1 = int(np.ceil(window.col_off + window.width)) + 1
        if row1 <= 0 or col1 <= 0 or row0 >= image.height or col0 >= image.width:
            return None
        return row0, col0, row1, col1

    def read(self, window):
        top, left = int(window.row_off), int(window.col_off)
        size_r, size_c = int(window.height), int(window.width)
        pieces = []
        for path, label_map, offset, vrt, (row0, col0, row1, col1) in self.sources:
            if row1 <= top or col1 <= left or row0 >= top + size_r or col0 >= left + size_c:
                continue
            if vrt is not None:
                pieces.append((None, read_window(vrt, window, indexes=1, path=path)))
                continue
            map_top, map_left = top + offset[0], left + offset[1]
            r0, c0 = max(map_top, 0), max(map_left, 0)
            r1, c1 = min(map_top + size_r, label_map.height), min(map_left + size_c, label_map.width)
            if r0 >= r1 or c0 >= c1:
                continue
            block = read_window(label_map, Window(c0, r0, c1 - c0, r1 - r0), indexes=1, path=path)
            if block.shape == (size_r, size_c):
                pieces.append((None, block))
            else:
                pieces.append(((r0 - map_top, c0 - map_left), block))
        if len(pieces) == 1 and pieces[0][0] is None:
            return pieces[0][1]
        labels = np.zeros((size_r, size_c), dtype=np.uint8)  # 0 = no data where no map tile covers
        for place, block in pieces:
            if place is None:
                labels = np.where(labels == 0, block, labels)
            else:
                region = labels[place[0]:place[0] + block.shape[0], place[1]:place[1] + block.shape[1]]
                region[region == 0] = block[region == 0]
        return labels

    def unknown_code_error(self, labels, window, patch_name):
        """InputError naming the first unknown code, the map file and pixel holding it, and its position."""
        row, col = (int(v) for v in np.argwhere(CODE_TO_CLASS[labels] == UNKNOWN_CLASS)[0])
        code = int(labels[row, col])
        x, y = self.image.xy(int(window.row_off) + row, int(window.col_off) + col)
        where, path = f"x {x:.6f}, y {y:.6f} ({self.image.crs})", self.image.name
        for source_path, label_map, _, _, _ in self.sources:
            xs, ys = transform_points(self.image.crs, label_map.crs, [x], [y])
            map_row, map_col = label_map.index(xs[0], ys[0])
            if 0 <= map_row < label_map.height and 0 <= map_col < label_map.width:
                path, where = source_path, f"map pixel (row {map_row}, col {map_col}), {where}"
                break
        valid = ", ".join(str(c) for c in WORLDCOVER_CODES)
        return InputError(path, f"unknown WorldCover code {code} at {where}, in patch {patch_name}",
                          f"one of the WorldCover 2021 codes {valid}")

    def close(self):
        for _, label_map, _, vrt, _ in self.sources:
            if vrt is not None:
                vrt.close()
            label_map.close()


# ---- 8-bit scaling ----

def scaling_tables(scaling, max_reflectance=0.3, low_high=None):
    """Per-band look-up tables DN -> uint8 for the scalings that do not depend on the patch.

    fixed: reflectance DN/10000 clipped to [0, max_reflectance], mapped to [0, 255]; percentile: each
    band's scene-wide [low, high] percentiles mapped to [0, 255]. Both truncate like patch_max.
    """
    values = np.arange(65536, dtype=np.float64)
    if scaling == "fixed":
        top = max(int(round(max_reflectance * 10000)), 1)
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
        peak = max(int(image[:len(order)].max()), 1)
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


# ---- one tile ----

def write_file(folder, name, data):
    """Write bytes to a temporary name and rename it into place (a killed run leaves no partial file).

    Unlike common.runs.atomic_write_bytes this skips fsync and Python's buffered file object: two
    fsyncs per patch would dominate the run time. The tile's journal is written after the files, so
    a patch whose files were lost is simply made again on the next run.
    """
    path, temporary = f"{folder}/{name}", f"{folder}/.{name}.{os.getpid()}.tmp"  # plain strings: per patch
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(handle, view):]
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
    if record is None:
        return False
    return record["status"] != "kept" or all(
        (folders[kind] / f"{record['name']}{ext}").exists() for kind, ext in (("images", extension),
                                                                               ("masks", ".png")))


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
            mosaic = LabelMosaic(image, job["map_paths"])
            low_high = None
            if settings["scaling"] == "percentile" and min(image.height, image.width) >= size:
                rng = np.random.default_rng([settings["seed"], zlib.crc32(tile.encode())])
                low_high = scene_percentiles(image, job["s2_path"], size, settings["percentile_windows"],
                                             settings["percentiles"], rng)
                require(low_high is not None, job["s2_path"], "has no valid pixel in the sampled windows",
                        "image data for --scaling percentile (or another --scaling)")
            tables = scaling_tables(settings["scaling"], settings["max_reflectance"], low_high)
            nodata = image.nodata
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
                    if codes[UNKNOWN_CODES].any():
                        raise mosaic.unknown_code_error(labels, window, name)
                    # Filters, first matching reason counted: no label, no image data, mostly water.
                    if codes[0]:
                        status = "label_nodata"
                    elif not pixels.any(axis=0).all() or (
                            nodata is not None and (pixels == nodata).all(axis=0).any()):
                        status = "image_nodata"
                    elif codes[WATER_CODE] > settings["max_water_fraction"] * labels.size:
                        status = "water"
                    else:
                        status = "kept"
                        write_patch(folders, name, extension, pixels, labels, settings, tables, image, window)
                    record = {"name": name, "row": row, "col": col, "status": status,
                              "codes": {str(c): int(codes[c]) for c in np.flatnonzero(codes)}}
                    journal.write(json.dumps(record) + "\n")  # buffered: a lost line only redoes a patch
        return {"tile": tile, "ok": True, "seconds": time.perf_counter() - started,
                "new_patches": new_patches,
                "percentiles": None if low_high is None else [v.tolist() for v in low_high]}
    except InputError as error:
        remove_tile_outputs(journal_path, folders, extension)
        return {"tile": tile, "ok": False, "file": error.path, "problem": error.problem,
                "expected": error.expected}
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
        write_geotiff(folders["images"] / f"{name}.tif", np.moveaxis(rgb_first, -1, 0),
                      transform=image.transform @ rasterio.Affine.translation(window.col_off, window.row_off),
                      crs=image.crs)
    mask = cv2.LUT(cv2.merge([labels, labels, labels]), CODE_TO_BGR)
    write_file(folders["masks"], f"{name}.png", cv2.imencode(".png", mask)[1])


def remove_tile_outputs(journal_path, folders, extension):
    for record in read_journal(journal_path).values():
        for kind, ext in (("images", extension), ("masks", ".png")):
            (folders[kind] / f"{record['name']}{ext}").unlink(missing_ok=True)
    journal_path.unlink(missing_ok=True)


# ---- inputs, split, resume ----

def find_tiles(s2_dir, map_dir):
    """Pair S2 composites with maps by tile id and check every file; returns (tiles, maps, failures)."""
    require_dir(s2_dir, "a folder of *_S2RGBNIR.tif files")
    require_dir(map_dir, "a folder of *_Map.tif files")
    failures, maps, tiles = [], {}, {}
    for path in sorted(Path(map_dir).glob("*_Map.tif")):
        match = TILE_ID.search(path.name)
        if match is None:
            failures.append(failure(None, path, "has no tile id in its name",
                                    "a name like ..._N36E027_Map.tif"))
            continue
        try:
            with open_geotiff(path, expected_bands=1) as label_map:
                require(label_map.dtypes[0] == "uint8", path, f"has dtype {label_map.dtypes[0]}",
                        "uint8 codes")
                require(label_map.crs is not None, path, "has no CRS", "a georeferenced GeoTIFF")
                maps[match.group()] = {"path": str(path), "crs": label_map.crs,
                                       "bounds": tuple(label_map.bounds)}
        except InputError as error:
            failures.append(failure(match.group(), error.path, error.problem, error.expected))
    s2_paths = sorted(Path(s2_dir).glob("*_S2RGBNIR.tif"))
    require(s2_paths, s2_dir, "holds no *_S2RGBNIR.tif file", "WorldCover 2021 S2 RGBNIR composites")
    for path in s2_paths:
        match = TILE_ID.search(path.name)
        if match is None:
            failures.append(failure(None, path, "has no tile id in its name",
                                    "a name like ..._N36E027_S2RGBNIR.tif"))
            continue
        tile = match.group()
        if tile in tiles:
            failures.append(failure(tile, path, f"has the tile id {tile} of {tiles[tile]['s2_path']} too",
                                    "one *_S2RGBNIR.tif per tile"))
            continue
        tiles[tile] = {"s2_path": str(path)}
        if tile not in maps:
            if not any(f["tile"] == tile for f in failures):
                failures.append(failure(tile, path, f"has no WorldCover map for tile {tile} in {map_dir}",
                                        f"{Path(map_dir) / f'*{tile}*_Map.tif'}"))
            continue
        try:
            with open_geotiff(path, expected_bands=4) as image:
                require(image.dtypes[0] == "uint16", path, f"has dtype {image.dtypes[0]}", "uint16 DNs")
                require(image.crs is not None, path, "has no CRS", "a georeferenced GeoTIFF")
                tiles[tile].update(crs=image.crs.to_string(), transform=tuple(image.transform)[:6],
                                   width=image.width, height=image.height)
        except InputError as error:
            failures.append(failure(tile, error.path, error.problem, error.expected))
    return tiles, maps, failures


def failure(tile, path, problem, expected):
    return {"tile": tile, "file": str(path), "problem": problem, "expected": expected}


def overlapping_maps(tile_info, maps):
    """Map files whose extent meets the S2 tile's (bounds compared in the map's CRS)."""
    transform = rasterio.Affine(*tile_info["transform"])
    left, top = transform @ (0, 0)
    right, bottom = transform @ (tile_info["width"], tile_info["height"])
    found = []
    for label_map in maps.values():
        x0, y0, x1, y1 = transform_bounds(tile_info["crs"], label_map["crs"], min(left, right),
                                          min(top, bottom), max(left, right), max(top, bottom),
                                          densify_pts=21)
        map_left, map_bottom, map_right, map_top = label_map["bounds"]
        if x0 < map_right and x1 > map_left and y0 < map_top and y1 > map_bottom:
            found.append(label_map["path"])
    return found


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
    names = [split for split, count in zip(SPLITS, counts) for _ in range(count)]
    return dict(zip(order, names))


def parse_split(text):
    if text.lower() == "none":
        return None
    try:
        ratios = [float(v) for v in text.split(",")]
    except ValueError:
        ratios = []
    require(len(ratios) == 3 and min(ratios) >= 0 and sum(ratios) > 0 and ratios[0] > 0, "--split",
            f"got {text!r}",
            "three non-negative train,val,test ratios with train > 0, e.g. 0.8,0.1,0.1, or none")
    return [r / sum(ratios) for r in ratios]


def output_folders(out, split):
    base = out / split if split else out
    return {"images": base / "images", "masks": base / "masks"}


def check_state(out, settings, overwrite):
    """A dataset folder built with other settings is never mixed into; identical ones continue."""
    state_path = out / ".progress" / "state.json"
    if state_path.exists() and overwrite:
        for name in ("train", "val", "test", "images", "masks", ".progress", "manifest.csv", "report.json",
                     "config.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    elif state_path.exists():
        previous = json.loads(state_path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        require(not changed, out, f"was built with other settings ({', '.join(changed)})",
                "the same settings to continue it, --overwrite to rebuild it, or another --out")
        return True
    atomic.write_json(state_path, settings)
    return False


# ---- demo data ----

def make_demo_data(folder, size, seed):
    """Two S2 RGBNIR tiles and the two WorldCover map tiles they straddle, in the release's formats.

    Tile N36E027 is on the maps' EPSG:4326 grid, shifted so its middle patch column straddles the
    N36E027 / N36E030 map boundary at 30 E; it holds a lake (a >90 % water patch), a map no-data block
    and an S2 no-data corner. Tile N36E030 is a UTM 35N scene across the same boundary, with a no-data
    corner. Land cover is a seeded Voronoi field using every WorldCover code (wetland, mangrove,
    moss, snow included), and the S2 reflectances follow each pixel's label plus noise.
    """
    require(size % 4 == 0 and size >= 256, "--demo_size", f"got {size}", "a multiple of 4, at least 256")
    rng = np.random.default_rng(seed)
    s2_dir, map_dir = Path(folder) / "S2RGB_2021", Path(folder) / "worldcover_2021"
    res = 3.0 / (2 * size)  # map and aligned-S2 pixel size in degrees
    centres = np.column_stack([rng.uniform(29.2, 30.9, 44), rng.uniform(36.0, 38.7, 44)])  # both S2 tiles
    codes = rng.permutation(np.resize(np.array(WORLDCOVER_CODES[1:]), 44))  # each code 4 times
    maps = {}
    for tile, lon0 in (("N36E027", 27.0), ("N36E030", 30.0)):
        lon = lon0 + (np.arange(2 * size) + 0.5) * res
        lat = 39.0 - (np.arange(2 * size) + 0.5) * res
        field = np.empty((2 * size, 2 * size), dtype=np.uint8)
        for r in range(2 * size):  # nearest Voronoi centre, one row at a time to bound memory
            distance = (lon[:, None] - centres[:, 0]) ** 2 + ((lat[r] - centres[:, 1]) * 1.25) ** 2
            field[r] = codes[distance.argmin(axis=1)]
        maps[tile] = (field, rasterio.Affine(res, 0, lon0, 0, -res, 39.0))
    a_transform = rasterio.Affine(res, 0, 30.0 - 384 * res, 0, -res, 39.0 - size / 4 * res)
    last = size // 256 - 1

    def paint(row0, col0, rows, cols, code):  # a block in tile N36E027's pixels, painted on the maps
        x0, y0 = a_transform @ (col0, row0)
        x1, y1 = a_transform @ (col0 + cols, row0 + rows)
        for field, transform in maps.values():
            lon = transform.c + (np.arange(field.shape[1]) + 0.5) * res
            lat = transform.f - (np.arange(field.shape[0]) + 0.5) * res
            field[np.ix_((lat < y0) & (lat > y1), (lon > x0) & (lon < x1))] = code

    paint(-10, -10, 276, 276, WATER_CODE)  # lake over patch (0, 0) with a small island
    paint(100, 100, 12, 12, 30)
    paint(40, last * 256 + 60, 8, 8, 0)  # map no-data in patch (0, last)
    for tile, (field, transform) in maps.items():
        write_geotiff(map_dir / f"ESA_WorldCover_10m_2021_v200_{tile}_Map.tif", field, transform=transform,
                      crs="EPSG:4326", nodata=0)

    means = {0: (900, 900, 900, 1500), 10: (300, 500, 250, 2800), 20: (700, 800, 500, 2200),
             30: (800, 1000, 600, 2600), 40: (1100, 1100, 800, 3000), 50: (1600, 1500, 1400, 1800),
             60: (2200, 2000, 1800, 2400), 70: (3500, 3600, 3700, 3400), 80: (200, 400, 600, 150),
             90: (500, 700, 500, 1500), 95: (250, 450, 300, 2000), 100: (1200, 1300, 1000, 1900)}
    reflectance = np.zeros((256, 4), dtype=np.float32)
    for code, mean in means.items():
        reflectance[code] = mean
    utm_centre = transform_points("EPSG:4326", "EPSG:32635", [30.15], [36.55])
    pixel_m = 115200.0 / size
    b_transform = rasterio.Affine(pixel_m, 0, utm_centre[0][0] - size / 2 * pixel_m, 0, -pixel_m,
                                  utm_centre[1][0] + size / 2 * pixel_m)
    for tile, crs, transform in (("N36E027", "EPSG:4326", a_transform),
                                 ("N36E030", "EPSG:32635", b_transform)):
        cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
        xs, ys = transform @ (cols.ravel(), rows.ravel())
        lon, lat = (np.asarray(v) for v in transform_points(crs, "EPSG:4326", xs, ys))
        labels = np.zeros(lon.size, dtype=np.uint8)
        for field, map_transform in maps.values():
            map_cols = np.floor((lon - map_transform.c) / res).astype(int)
            map_rows = np.floor((map_transform.f - lat) / res).astype(int)
            inside = ((map_cols >= 0) & (map_cols < field.shape[1])
                      & (map_rows >= 0) & (map_rows < field.shape[0]))
            labels[inside] = field[map_rows[inside], map_cols[inside]]
        pixels = reflectance[labels].T.reshape(4, size, size) + rng.normal(0, 120, (4, size, size))
        pixels = np.clip(pixels, 1, 10000).astype(np.uint16)
        corner = np.add.outer(np.arange(size), -np.arange(size)) > size - 80  # bottom-left triangle
        if tile == "N36E030":
            corner = np.add.outer(np.arange(size), np.arange(size)) > 2 * size - 80  # bottom-right
        pixels[:, corner] = 0
        write_geotiff(s2_dir / f"ESA_WorldCover_10m_2021_v200_{tile}_S2RGBNIR.tif", pixels,
                      transform=transform, crs=crs, tile_size=256)
    return s2_dir, map_dir


# ---- main ----

@cli_entry
def main(args):
    # A file without georeferencing is reported by our own checks as one line; GDAL's warning would
    # only precede that line with a traceback-like note.
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    random.seed(args.seed)
    np.random.seed(args.seed)
    started = time.perf_counter()
    out = Path(args.out) if args.out else Path(args.results_dir) / "dataset_creator" / (
        args.run_name or ("demo" if args.demo else "ARAS400k"))
    if args.demo:
        args.s2_dir, args.map_dir = make_demo_data(Path(args.results_dir) / "demo_data" / "dataset_creator",
                                                   args.demo_size, args.seed)
    args.stride = args.stride or args.patch_size
    require(args.patch_size > 0 and args.stride > 0, "--patch_size/--stride", "must be positive",
            "pixels > 0")
    require(0 <= args.max_water_fraction <= 1, "--max_water_fraction", f"got {args.max_water_fraction}",
            "a fraction in [0, 1]")
    require(args.workers >= 1, "--workers", f"got {args.workers}", "at least 1")
    ratios = parse_split(args.split)
    runs.print_args(args)

    # ---- inputs ----
    tiles, maps, failures = find_tiles(args.s2_dir, args.map_dir)
    if failures and not args.keep_going:
        first = failures[0]
        raise InputError(first["file"], first["problem"], first["expected"])
    split_of = split_tiles(list(tiles), ratios, args.seed)
    settings = {key: getattr(args, key) for key in ("patch_size", "stride", "max_water_fraction", "scaling",
                                                   "max_reflectance", "percentile_windows", "bands",
                                                   "image_format", "seed")}
    settings.update(percentiles=list(args.percentiles), split_ratios=ratios, tiles=sorted(tiles))
    continuing = check_state(out, settings, args.overwrite)
    failed = {f["tile"] for f in failures}
    jobs = []
    for tile in sorted(set(tiles) - failed):
        info = tiles[tile]
        folders = output_folders(out, split_of[tile])
        jobs.append({"tile": tile, "s2_path": info["s2_path"], "map_paths": overlapping_maps(info, maps),
                     "folders": {k: str(v) for k, v in folders.items()}, "settings": settings,
                     "journal": str(out / ".progress" / f"{tile}.jsonl"), "cache_mb": args.cache_mb})
        info.update(split=split_of[tile], map_files=jobs[-1]["map_paths"])
    grid = {tile: (len(range(0, info["height"] - args.patch_size + 1, args.stride)),
                   len(range(0, info["width"] - args.patch_size + 1, args.stride)))
            for tile, info in tiles.items() if "width" in info}
    print(f"tiles: {len(tiles)} paired, {len(failures)} failed checks, {len(maps)} map tiles; patches per "
          f"tile {sorted({r * c for r, c in grid.values()})}; output {out}"
          + (" (continuing an earlier build)" if continuing else ""))

    # ---- patches ----
    def report_result(result):
        if result["ok"]:
            total, new = grid[result["tile"]][0] * grid[result["tile"]][1], result["new_patches"]
            print(f"tile {result['tile']}: {new} patches in {result['seconds']:.1f} s "
                  f"({new / max(result['seconds'], 1e-9):.1f} patches/s), {total - new} done before",
                  flush=True)
            tiles[result["tile"]]["percentiles"] = result["percentiles"]
        else:
            failures.append(failure(result["tile"], result["file"], result["problem"], result["expected"]))
            print(f"tile {result['tile']} failed: {result['file']}: {result['problem']}", flush=True)

    if args.workers == 1:
        for job in jobs:
            report_result(process_tile(job))
            if failures and not args.keep_going:
                break
    else:
        context = multiprocessing.get_context("spawn")  # no GDAL handles inherited across fork
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
            futures = [pool.submit(process_tile, job) for job in jobs]
            for future in futures:
                report_result(future.result())
                if failures and not args.keep_going:
                    pool.shutdown(cancel_futures=True)
                    break
    if failures and not args.keep_going:
        first = failures[0]
        raise InputError(first["file"], first["problem"], first["expected"])

    # ---- manifest and report ----
    failed = {f["tile"] for f in failures}
    rows, per_tile = [], {}
    before, after = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for tile in sorted(set(tiles) - failed):
        info = tiles[tile]
        transform = rasterio.Affine(*info["transform"])
        summary = {"split": info["split"], "s2_file": info["s2_path"], "map_files": info["map_files"],
                   "patches": 0, "kept": 0, "dropped": dict.fromkeys(DROP_REASONS, 0),
                   "percentiles": info.get("percentiles")}
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
            classes = np.bincount(CODE_TO_CLASS[np.flatnonzero(codes)], weights=codes[codes > 0], minlength=7)
            top, left = record["row"] * args.stride, record["col"] * args.stride
            x0, y0 = transform @ (left, top)
            x1, y1 = transform @ (left + args.patch_size, top + args.patch_size)
            row = {"patch": f"{record['name']}.{args.image_format}", "split": info["split"] or "",
                   "tile": tile, "row": record["row"], "col": record["col"], "left": min(x0, x1),
                   "bottom": min(y0, y1), "right": max(x0, x1), "top": max(y0, y1), "crs": info["crs"]}
            row.update({f"frac_{name}": round(float(classes[i]) / codes.sum(), 6)
                        for i, name in enumerate(CLASS_NAMES)})
            rows.append(row)
        per_tile[tile] = summary
    fieldnames = ["patch", "split", "tile", "row", "col", "left", "bottom", "right", "top", "crs"] + [
        f"frac_{name}" for name in CLASS_NAMES]
    atomic.write_csv(out / "manifest.csv", rows, fieldnames)
    kept_by_split = {split: sum(s["kept"] for s in per_tile.values() if s["split"] == split)
                     for split in SPLITS}
    totals = {"tiles": len(tiles), "tiles_failed": len(failed),
              "patches": sum(s["patches"] for s in per_tile.values()),
              "kept": len(rows), "kept_by_split": kept_by_split if ratios else None,
              "dropped": {r: sum(s["dropped"][r] for s in per_tile.values()) for r in DROP_REASONS}}
    class_pixels = np.bincount(CODE_TO_CLASS[np.flatnonzero(after)], weights=after[after > 0], minlength=7)
    report = {
        "totals": totals, "tiles": per_tile, "failures": failures,
        "split": {"ratios": ratios, "seed": args.seed,
                  "tiles": ({s: sorted(t for t, v in split_of.items() if v == s) for s in SPLITS}
                            if ratios else None)},
        "code_pixels_before_filtering": {str(c): int(before[c]) for c in np.flatnonzero(before)},
        "code_pixels_after_filtering": {str(c): int(after[c]) for c in np.flatnonzero(after)},
        "class_pixels_after_filtering": {name: int(class_pixels[i]) for i, name in enumerate(CLASS_NAMES)},
        "remapped_pixels_after_filtering": {REMAP_NAMES[c]: int(after[c]) for c in REMAP},
        "palette": {name: PALETTE[i].tolist() for i, name in enumerate(CLASS_NAMES)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic.write_json(out / "report.json", report)
    runs.write_config(out, args, settings=settings, out=str(out))
    dropped = ", ".join(f"{reason} {count}" for reason, count in totals["dropped"].items())
    by_split = (" (" + ", ".join(f"{s} {n}" for s, n in kept_by_split.items()) + ")") if ratios else ""
    print(f"summary: tiles {totals['tiles']} (failed {totals['tiles_failed']}), patches {totals['patches']}, "
          f"kept {totals['kept']}{by_split}, dropped {dropped}, {report['seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
