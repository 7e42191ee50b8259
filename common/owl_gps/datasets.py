"""OWL-GPS datasets: the tutorial's folder (images.npy, labels.npy, concepts) or a tiled GeoTIFF scene.

Both layouts load into one dict `{"source", "labels", "active", "locations", "name"}`:
`source.read(ids)` returns patches `(len(ids), H, W, 4)` float32 (R, G, B, NIR) (see
`common.owl_gps.patches`), `labels` is `(N,)` 0/1 or None (an unlabelled pool, which only a person
can label), `active` is the `(N, C)` boolean matrix of the named concepts, `locations` is the `(N, 2)`
patch grid (row, col) for GeoTIFF tiles and None otherwise, and `name` is the input's path for
messages. `synthetic_dataset` is the tutorial's synthetic set (the demo data) and `write_dataset`
writes it in the folder layout. Every problem with the user's files is an InputError naming the file.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import InputError, require, require_dir, require_file
from common.owl_gps import concepts, patches
from common.raster import open_geotiff


def load_npy_dataset(data_dir, concept_names: Sequence[str], threshold: float) -> dict:
    """The tutorial's folder: `images.npy` (N,4,H,W), optional `labels.npy` (N,) 0/1, concepts keyed by id.

    Concepts come from `concepts.csv`, else from the tutorial's `concepts.pkl` (read without running
    code). Without labels.npy the pool is unlabelled (labels None): only a person can label it. A
    large images.npy is streamed from disk batch by batch rather than loaded.

    Args:
        data_dir: the folder.
        concept_names: the concept columns the acquisition score weighs, e.g. `urban, near_industrial`.
        threshold: `near_industrial` = dist_industrial < threshold when the column is derived.

    Returns:
        The dataset dict (see the module docstring), `locations` None.
    """
    data_dir = require_dir(data_dir, "a folder with images.npy, concepts.csv (or .pkl), labels.npy if known")
    source = patches.open_images_npy(data_dir / "images.npy")
    labels_path = data_dir / "labels.npy"
    labels = None
    if labels_path.exists():
        labels_path = require_file(labels_path, "labels.npy with one 0/1 label per patch")
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                labels_path, f"cannot be read as .npy ({message})", "labels.npy (N,) 0/1"
            ) from None
        require(
            isinstance(labels, np.ndarray), labels_path, "is not a single .npy array", "labels.npy (N,) 0/1"
        )
        require(
            labels.shape == (source.count,),
            labels_path,
            f"has shape {labels.shape}",
            f"shape ({source.count},) matching images.npy",
        )
        labels = concepts.read_binary_labels(labels, labels_path)
    concepts_path, table = data_dir / "concepts.csv", None
    if not concepts_path.exists() and (data_dir / "concepts.pkl").exists():
        concepts_path = data_dir / "concepts.pkl"
        table = concepts.read_concepts_pickle(concepts_path)
    if table is None and not concepts_path.exists():
        expected = "concepts.csv (id, land_cover, dist_industrial, ...) or the tutorial's concepts.pkl"
        raise InputError(concepts_path, "file not found", expected)
    table = concepts.read_concepts_table(concepts_path, ("id",), concept_names, threshold, table)
    ids = concepts.integer_column(table["id"], concepts_path, "id")
    missing = np.setdiff1d(np.arange(source.count), ids)
    if len(missing):
        raise InputError(
            concepts_path,
            f"no row for id {missing[0]} ({len(missing)} ids missing)",
            f"one row for every id 0..{source.count - 1}",
        )
    table = table.set_index(ids).loc[np.arange(source.count)]
    return {
        "source": source,
        "labels": labels,
        "active": concepts.concept_matrix(table, concept_names),
        "locations": None,
        "name": str(data_dir),
    }


def load_geotiff_dataset(
    geotiff,
    concept_names: Sequence[str],
    patch_size: int = 32,
    reflectance_scale: float = 1.0,
    threshold: float = 0.3,
    concepts_csv=None,
    land_cover_geotiff=None,
    distance_geotiff=None,
    labels_csv=None,
) -> dict:
    """Tile a 4-band GeoTIFF into patches (dropping those touching nodata) and attach concepts and labels.

    Concepts come from `concepts_csv` keyed by patch grid (row, col), or from a land-cover raster
    (patch majority; 1 = urban) and a distance-to-industry raster (patch mean) on the same grid.
    Known labels, when given, come from `labels_csv` (row, col, label); without them the pool is
    unlabelled.

    Args:
        geotiff: the 4-band (R, G, B, NIR) scene.
        concept_names: the concept columns the acquisition score weighs.
        patch_size: the patch side in pixels.
        reflectance_scale: every value is divided by this (10000 for Sentinel-2 L2A).
        threshold: `near_industrial` = dist_industrial < threshold when the column is derived.
        concepts_csv: concepts per patch keyed by `row, col`; or
        land_cover_geotiff: with `distance_geotiff`, single-band rasters on the scene's grid.
        distance_geotiff: distance to industry in [0, 1].
        labels_csv: known labels keyed by `row, col`, or None.

    Returns:
        The dataset dict (see the module docstring) with the kept patches' grid `locations`.
    """
    import pandas as pd

    rasters = tuple(
        open_geotiff(path, 1) if path else None for path in (land_cover_geotiff, distance_geotiff)
    )
    try:
        images, locations, concept_rows = patches.tile_geotiff(
            geotiff, patch_size, reflectance_scale, rasters
        )
    finally:
        for raster in rasters:
            if raster is not None:
                raster.close()
    if land_cover_geotiff:
        table = pd.DataFrame(concept_rows)
        table["urban"] = (table["land_cover"] == 1).astype(int)
        table["near_industrial"] = (table["dist_industrial"] < threshold).astype(int)
        unknown = [name for name in concept_names if name not in table]
        require(
            not unknown,
            "--concept_weights",
            f"names {unknown} not computable from rasters",
            "urban and/or near_industrial",
        )
    else:
        require(
            concepts_csv,
            "--concepts_csv",
            "missing",
            "a concepts CSV (row, col, ...) or --land_cover_geotiff + --distance_geotiff",
        )
        table = concepts.read_concepts_table(concepts_csv, ("row", "col"), concept_names, threshold)
        table = concepts.align_by_location(table, locations, concepts_csv, "concepts")
    labels = None
    if labels_csv:
        label_table = concepts.read_keyed_csv(labels_csv, ("row", "col", "label"))
        label_table = concepts.align_by_location(label_table, locations, labels_csv, "label")
        label_column = concepts.integer_column(label_table["label"], labels_csv, "label")
        labels = concepts.read_binary_labels(label_column, labels_csv)
    return {
        "source": patches.ArrayPatches(images),
        "labels": labels,
        "active": concepts.concept_matrix(table, concept_names),
        "locations": locations,
        "name": str(geotiff),
    }


def synthetic_dataset(
    n_samples: int = 500, image_size: int = 32, signal: float = 0.1, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The OWL-GPS tutorial's synthetic set: noise patches, random concepts, label probability from concepts.

    Concepts per patch: land_cover in {0 forest, 1 urban, 2 water, 3 agricultural}, dist_industrial
    uniform in [0, 1], urban = land_cover == 1, near_industrial = dist_industrial < 0.3.
    P(target) = 0.1 + 0.3 * urban + 0.4 * near_industrial. With signal > 0 a target patch also carries
    a Gaussian blob of raised NIR and lowered red (a vegetation-index-like signature), so a CNN can
    learn it; with signal 0 the pixels are pure noise as in the tutorial.

    Args:
        n_samples: patches (the tutorial's 500).
        image_size: patch side in pixels (the tutorial's 32).
        signal: height of the planted NIR-up / red-down blob in target patches.
        seed: the generator's seed (the tutorial's 42).

    Returns:
        images `(N, 4, H, W)` float32 in [0, 1], labels `(N,)` 0/1 and the concept columns by name
        (`id, land_cover, dist_industrial, urban, near_industrial`).
    """
    rng = np.random.default_rng(seed)
    images = rng.random((n_samples, 4, image_size, image_size), dtype=np.float32)
    land_cover = rng.integers(0, 4, n_samples)
    dist_industrial = rng.random(n_samples)
    urban = (land_cover == 1).astype(np.int64)
    near_industrial = (dist_industrial < 0.3).astype(np.int64)
    probability = 0.1 + 0.3 * urban + 0.4 * near_industrial
    labels = (rng.random(n_samples) < probability).astype(np.int64)
    grid = np.arange(image_size, dtype=np.float32)
    for index in np.flatnonzero(labels):
        centre_y, centre_x = rng.uniform(0.25, 0.75, 2) * image_size
        squared = (grid[:, None] - centre_y) ** 2 + (grid[None, :] - centre_x) ** 2
        blob = np.exp(-squared / (2 * (image_size / 6) ** 2))
        images[index, 3] += signal * blob
        images[index, 0] -= signal * blob
    np.clip(images, 0.0, 1.0, out=images)
    columns = {
        "id": np.arange(n_samples),
        "land_cover": land_cover,
        "dist_industrial": dist_industrial,
        "urban": urban,
        "near_industrial": near_industrial,
    }
    return images, labels, columns


def write_dataset(folder, images: np.ndarray, labels: np.ndarray, concept_columns: dict) -> None:
    """Write the tutorial's folder layout: images.npy, labels.npy, concepts.csv (never pickle).

    Args:
        folder: created if missing.
        images: `(N, 4, H, W)` float32.
        labels: `(N,)` 0/1.
        concept_columns: `{column: (N,) values}`; dist_industrial is written with 6 decimals, the
            other columns as integers.
    """
    folder = Path(folder)
    atomic.save_npy(folder / "images.npy", images)
    atomic.save_npy(folder / "labels.npy", labels)
    rows = [
        {
            key: (f"{values[i]:.6f}" if key == "dist_industrial" else int(values[i]))
            for key, values in concept_columns.items()
        }
        for i in range(len(labels))
    ]
    atomic.write_csv(folder / "concepts.csv", rows, list(concept_columns))
