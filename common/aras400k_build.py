"""ARAS400k dataset build records: tile journals, tile- or patch-level splits, shards and their merge.

`dataset_creator.py` cuts tiles into patches; this module keeps what lets a build stop, continue,
run as N independent shards and be merged into exactly the folder one unsharded run writes:

- one journal per tile, `<out>/.progress/<tile>.jsonl`, a line per finished patch (`read_journal`);
- the seeded split of tiles (or, for small inputs, of patches) into train/val/test (`split_names`);
- `--shard K/N`: tiles dealt round-robin in id order, shard K writing `<out>/shards/K_of_N/`;
- `manifest.csv`, `report.json`, `.progress/tiles.json` and `class_percentages/<split>.csv` built
  from the journals, and the patch files moved into their split folders (`finish_build`);
- `merge_shards`: the shards' journals and tile records joined, then `finish_build` as one run.
"""

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from common import aras400k, atomic, runs
from common.aras400k import CLASS_KEYS, CLASS_NAMES, CODE_TO_CLASS, PALETTE, REMAP, REMAP_NAMES, SPLITS
from common.errors import InputError, require, require_dir

DROP_REASONS = ("label_nodata", "image_nodata", "water")
MANIFEST_FIELDS = ["patch", "split", "tile", "row", "col", "left", "bottom", "right", "top", "crs"]
MANIFEST_FIELDS += [f"frac_{name}" for name in CLASS_KEYS]
PATCH_LEVEL_NOTE = (
    "patch-level split: patches of one tile sit in several splits, so neighbouring, correlated patches "
    "are in train and test and test scores are optimistic; for inputs with fewer than 3 tiles only"
)

# ---- journals ----


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
    splits = [split for split, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
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


def parse_shard(text):
    """--shard K/N -> (K, N) with 1 <= K <= N; '' -> None."""
    if not text:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        index = count = 0
    require(1 <= index <= count, "--shard", f"got {text!r}", "K/N with 1 <= K <= N, e.g. 2/8")
    return index, count


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
        names = (*SPLITS, "images", "masks", ".progress", "class_percentages", "shards")
        for name in (*names, "manifest.csv", "report.json", "config.json"):
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
    sources = [out / split for split in SPLITS]
    move_patches(out, dict.fromkeys(kept_names(out, tiles)), sources, extension)


# ---- manifest, report, class percentages ----


def manifest_row(record, tile, info, split, settings, codes) -> dict:
    """One manifest.csv row: name, split, grid place, bounds, CRS and the 7 class fractions."""
    import rasterio

    classes = np.bincount(CODE_TO_CLASS[np.flatnonzero(codes)], weights=codes[codes > 0], minlength=7)
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
        {f"frac_{name}": round(float(classes[i]) / codes.sum(), 6) for i, name in enumerate(CLASS_KEYS)}
    )
    row["_class_pixels"] = classes.astype(np.int64)  # for the class-percentage tables, not a column
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


def write_percentages(out, rows) -> None:
    """`class_percentages/<split>.csv` (`all.csv` when flat) from the manifest's class fractions.

    The same table `aras400k.write_class_percentages` makes by decoding the masks (a test compares
    them), taken from the journals' pixel counts instead: decoding every mask again would add about
    a fifth to the build time.
    """
    for split in sorted({row["split"] for row in rows}):
        table = []
        for row in sorted((r for r in rows if r["split"] == split), key=lambda r: r["patch"]):
            counts = row.pop("_class_pixels")
            total = max(int(counts.sum()), 1)
            shares = {n: round(100.0 * int(c) / total, 2) for n, c in zip(CLASS_NAMES, counts, strict=True)}
            table.append({"filename": Path(row["patch"]).stem + ".png", **shares})
        atomic.write_csv(
            aras400k.percentages_csv_path(out, split or "all"), table, aras400k.PERCENTAGE_COLUMNS
        )


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
    write_percentages(out, rows)
    atomic.write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)
    totals = {
        "tiles": len(tiles),
        "tiles_failed": len(failed),
        "patches": sum(s["patches"] for s in per_tile.values()),
        "kept": len(rows),
        "kept_by_split": {s: sum(r["split"] == s for r in rows) for s in SPLITS} if ratios else None,
        "dropped": {r: sum(s["dropped"][r] for s in per_tile.values()) for r in DROP_REASONS},
    }
    class_pixels = np.bincount(CODE_TO_CLASS[np.flatnonzero(after)], weights=after[after > 0], minlength=7)
    tiles_by_split = {s: sorted(t for t in tiles if split_of.get(t) == s) for s in SPLITS}
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
        "class_pixels_after_filtering": {name: int(class_pixels[i]) for i, name in enumerate(CLASS_KEYS)},
        "remapped_pixels_after_filtering": {REMAP_NAMES[c]: int(after[c]) for c in REMAP},
        "palette": {name: PALETTE[i].tolist() for i, name in enumerate(CLASS_KEYS)},
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
    if failures and not keep_going:
        first = failures[0]
        raise InputError(first["file"], first["problem"], first["expected"])
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
