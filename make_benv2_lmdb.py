"""Write the BigEarthNet v2 LMDB from the released GeoTIFF folders (what rico-hdl writes, without rico-hdl).

Dataset: Clasen et al., "reBEN: Refined BigEarthNet Dataset for Remote Sensing Image Analysis". Input: the
Sentinel-2 folder `BigEarthNet-S2/<tile>/<patch>/<patch>_<band>.tif` and optionally `Reference_Maps/<tile>/
<patch>/<patch>_reference_map.tif`. Output, one key per patch as rico-hdl stores it: `<patch>` -> safetensors
dict of the twelve bands at their stored sizes and dtype (values unchanged), `<patch>_reference_map` ->
`{"Data": (120, 120) uint16}`. Sentinel-1 patches are not converted (the SPML experiments use S2 only).
With --metadata the patches are those of metadata.parquet and --split_lmdbs writes one LMDB per split,
`BigEarthNetV2_LMDB/{train,val,test}_BENv2.lmdb` (+ a copy of metadata.parquet): the layout
train_multilabel_model.py --dataset benv2 reads. Written under a `.partial` name and renamed when complete; a
bad input found on the way removes the partial folder and ends in one line naming the file.

    python make_benv2_lmdb.py --s2_dir BigEarthNet-S2 --reference_maps_dir Reference_Maps \
        --metadata metadata.parquet --split_lmdbs --out data/BigEarthNetV2
    python make_benv2_lmdb.py --demo          # GeoTIFFs of 20 generated patches, converted (seconds)

Ends with `wrote <n> patches (<m> reference maps) to <output>`.
"""

import shutil
from pathlib import Path

from common import cli


def get_args_parser():
    parser = cli.Parser(description="BigEarthNet v2 GeoTIFF folders -> the LMDB of safetensors records.")
    cli.add_demo_argument(parser, "(GeoTIFFs of 20 generated patches; seconds).")
    parser.add_argument("--s2_dir", default="BigEarthNet-S2", help="BigEarthNet-S2/<tile>/<patch>/*.tif.")
    parser.add_argument(
        "--reference_maps_dir", default="", help="Reference_Maps/ (empty: no reference maps)."
    )
    parser.add_argument("--metadata", default="", help="metadata.parquet: which patches, and their splits.")
    parser.add_argument("--split_lmdbs", action="store_true", help="One LMDB per split (needs --metadata).")
    parser.add_argument("--out", default="data/BigEarthNetV2", help="Output dataset folder.")
    parser.renamed("--output", "--out")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    parser.add_argument("--results_dir", default="results", help="Where --demo writes its files.")
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

from common import atomic, raster
from common.errors import InputError, cli_entry, require, require_dir
from common.spml import bigearthnet


def patch_folders(s2_dir) -> dict[str, Path]:
    """`{patch name: folder}` of `<s2_dir>/<tile>/<patch>/`."""
    root = require_dir(s2_dir, "the BigEarthNet-S2 folder (<tile>/<patch>/<patch>_<band>.tif)")
    folders = {folder.name: folder for folder in sorted(root.glob("*/*")) if folder.is_dir()}
    require(folders, root, "no patch folders", "<tile>/<patch>/<patch>_<band>.tif")
    return folders


def read_band(path) -> np.ndarray:
    from rasterio.errors import RasterioIOError

    with raster.open_geotiff(path, expected_bands=1) as dataset:
        try:
            return dataset.read(1)
        except RasterioIOError as error:  # a truncated file opens, then fails on its pixels
            problem = f"pixels cannot be read ({str(error).splitlines()[0][:120]})"
            raise InputError(path, problem, "a complete single-band GeoTIFF") from None


def patch_record(name: str, folder: Path) -> bytes:
    """The safetensors dict of one patch's twelve bands, as stored in its GeoTIFFs."""
    from safetensors.numpy import save as save_safetensors

    bands = {}
    for band, size in bigearthnet.BAND_SIZES.items():
        path = folder / f"{name}_{band}.tif"
        require(path.is_file(), path, "band file missing", f"the 12 band GeoTIFFs of {name}")
        array = read_band(path)
        require(array.shape == (size, size), path, f"shape {array.shape}", f"{size} x {size} pixels")
        bands[band] = array
    return save_safetensors(bands)


def reference_record(reference_root: Path, name: str, tile: str) -> bytes:
    from safetensors.numpy import save as save_safetensors

    path = reference_root / tile / name / f"{name}{bigearthnet.REFERENCE_MAP_SUFFIX}.tif"
    require(
        path.is_file(),
        path,
        "reference map missing",
        "Reference_Maps/<tile>/<patch>/<patch>_reference_map.tif",
    )
    return save_safetensors({"Data": read_band(path).astype(np.uint16)})


def write_lmdb(path: Path, names, folders, reference_root) -> int:
    """One LMDB of `names` (and their reference maps); returns the number of reference maps written."""
    import lmdb

    path.mkdir(parents=True, exist_ok=True)
    environment = lmdb.open(str(path), map_size=1 << 40)
    written = 0
    try:
        for start in range(0, len(names), 256):  # one write transaction per 256 patches
            with environment.begin(write=True) as transaction:
                for name in names[start : start + 256]:
                    require(name in folders, name, "patch folder missing", "a folder per metadata patch_id")
                    transaction.put(name.encode(), patch_record(name, folders[name]))
                    if reference_root:
                        tile = folders[name].parent.name
                        key = f"{name}{bigearthnet.REFERENCE_MAP_SUFFIX}".encode()
                        transaction.put(key, reference_record(reference_root, name, tile))
                        written += 1
    finally:
        environment.close()
    return written


def write_demo_tiffs(root: Path, num_patches: int, seed: int) -> Path:
    """GeoTIFF folders and metadata.parquet of generated patches (`bigearthnet.demo_patch`)."""
    import pandas as pd

    rng, rows = np.random.default_rng(seed), []
    for i in range(num_patches):
        present, bands, reference, _ = bigearthnet.demo_patch(rng)
        tile, name = "S2A_MSIL2A_DEMO_T33UUP", f"S2A_MSIL2A_DEMO_T33UUP_{i}_0"
        for band, array in bands.items():
            raster.write_geotiff(root / "BigEarthNet-S2" / tile / name / f"{name}_{band}.tif", array)
        raster.write_geotiff(root / "Reference_Maps" / tile / name / f"{name}_reference_map.tif", reference)
        split = ("train", "train", "train", "validation", "test")[i % 5]
        rows.append({"patch_id": name, "labels": [bigearthnet.CLASSES[c] for c in present], "split": split})
    with atomic.atomic_path(root / "metadata.parquet") as temporary:
        pd.DataFrame(rows).to_parquet(temporary)
    return root


def write_outputs(args, partial: Path, names, splits, folders, reference_root) -> int:
    """The LMDB(s) and metadata copy under `partial`; returns the number of reference maps written."""
    if not args.split_lmdbs:
        references = write_lmdb(partial / "lmdb", names, folders, reference_root)
        if args.metadata:
            shutil.copyfile(args.metadata, partial / "metadata.parquet")
        return references
    references = 0
    for split, file_name in bigearthnet.SPLIT_LMDBS.items():
        chosen = [name for name, part in zip(names, splits, strict=True) if part == split]
        references += write_lmdb(partial / "BigEarthNetV2_LMDB" / file_name, chosen, folders, reference_root)
    shutil.copyfile(args.metadata, partial / "BigEarthNetV2_LMDB" / "metadata.parquet")
    return references


@cli_entry
def main(args):
    if args.demo:
        tiffs = write_demo_tiffs(cli.demo_data_dir(args, "make_benv2_lmdb"), 20, seed=3)
        args.s2_dir, args.reference_maps_dir = str(tiffs / "BigEarthNet-S2"), str(tiffs / "Reference_Maps")
        args.metadata, args.split_lmdbs = str(tiffs / "metadata.parquet"), True
        args.out, args.overwrite = str(Path(args.results_dir) / "make_benv2_lmdb" / "demo"), True
    require(not args.split_lmdbs or args.metadata, "--split_lmdbs", "needs --metadata", "the splits' table")
    output = Path(args.out)
    if output.exists() and not args.overwrite:
        raise InputError(output, "exists", "--overwrite to replace it, or another --out")
    require(not output.exists() or output.is_dir(), output, "is a file", "a dataset folder for --out")
    require(output.parent.is_dir() or not output.parent.exists(), output.parent, "not a folder", "a folder")
    folders = patch_folders(args.s2_dir)
    reference_root = (
        require_dir(args.reference_maps_dir, "Reference_Maps/") if args.reference_maps_dir else None
    )
    if args.metadata:
        table, _ = bigearthnet.read_metadata(args.metadata, drop_snow_cloud=False)
        names, splits = list(table["patch_id"].astype(str)), table["split"].astype(str).to_numpy()
        missing = [name for name in names if name not in folders]
        require(not missing, args.metadata, f"patch {missing[:1]} has no folder", "a folder per patch_id")
    else:
        names, splits = sorted(folders), None
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        references = write_outputs(args, partial, names, splits, folders, reference_root)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise InputError(
            partial, f"cannot be written ({error.strerror or error})", "a writable folder"
        ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        raise
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)
    print(f"wrote {len(names)} patches ({references} reference maps) to {output}")
    return output


if __name__ == "__main__":
    main(get_args_parser().parse_args())
