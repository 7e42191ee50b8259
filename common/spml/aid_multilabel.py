"""AID-multilabel reader: JPEG tree + label CSVs, single positives, seeded validation split, demo writer.

Layout (Hua et al., "Relation Network for Multi-label Aerial Image Classification", the AID-multilabel
release): `images_tr/<SceneClass>/*.jpg`, `images_test/<SceneClass>/*.jpg`, `multilabel_correct_final.csv`
(image name + 17 0/1 columns, matched by name) and `single_positive_labels_manual.csv` (same layout, one
1 per row). Random single positives are drawn once (seeded) and saved next to the data.
"""

import csv
import json
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import InputError, require, require_dir, require_file
from common.spml import single_positives

CLASSES = (
    "airplane",
    "bare-soil",
    "buildings",
    "cars",
    "chaparral",
    "court",
    "dock",
    "field",
    "grass",
    "mobile-home",
    "pavement",
    "sand",
    "sea",
    "ship",
    "tanks",
    "trees",
    "water",
)
LABELS_CSV = "multilabel_correct_final.csv"
MANUAL_CSV = "single_positive_labels_manual.csv"


def read_label_csv(path, class_names=CLASSES, one_positive: bool = False) -> tuple[list[str], np.ndarray]:
    """Read `image name, <class columns>` with 0/1 entries; return (names, uint8 matrix in class order)."""
    path = require_file(path, "a CSV with an image-name column and one 0/1 column per class")
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.reader(file))
    except (UnicodeDecodeError, csv.Error) as error:
        problem = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else f"not a CSV ({error})"
        raise InputError(
            path, problem, "a CSV with an image-name column and one 0/1 column per class"
        ) from None
    require(len(rows) >= 2, path, "no data rows", "a header and one row per image")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in class_names if c not in header[1:]]
    require(
        not missing,
        path,
        f"class column(s) missing: {', '.join(missing)}",
        f"columns {', '.join(class_names)} after the image-name column",
    )
    columns = [header.index(c) for c in class_names]
    names, matrix = [], np.zeros((len(rows) - 1, len(class_names)), np.uint8)
    for row_number, row in enumerate(rows[1:], start=2):
        require(len(row) == len(header), path, f"row {row_number} has {len(row)} fields", f"{len(header)}")
        try:
            values = [int(float(row[i])) for i in columns]
        except ValueError:
            raise InputError(
                path, f"row {row_number} has a non-numeric label", "0 or 1 in every class column"
            ) from None
        require(all(v in (0, 1) for v in values), path, f"row {row_number} has a label outside 0/1", "0 or 1")
        if one_positive:
            require(
                sum(values) == 1,
                path,
                f"row {row_number} has {sum(values)} positives",
                "exactly one observed positive per image",
            )
        names.append(Path(row[0].strip()).stem)
        matrix[row_number - 2] = values
    return names, matrix


def write_label_csv(path, names, matrix, class_names=CLASSES) -> None:
    """The inverse of `read_label_csv`, written atomically."""
    header = ("image", *class_names)
    rows = [
        dict(zip(header, [n] + [int(v) for v in row], strict=True))
        for n, row in zip(names, matrix, strict=True)
    ]
    atomic.write_csv(path, rows, list(header))


def list_images(folder) -> dict[str, Path]:
    """`{stem: path}` of the JPEGs in `folder/<SceneClass>/`."""
    return {p.stem: p for p in sorted(Path(folder).glob("*/*")) if p.suffix.lower() in (".jpg", ".jpeg")}


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
# Markers without a length field (TEM, RST0-7) and the frame headers that carry the image size.
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}
_FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def check_jpeg(path) -> None:
    """Raise InputError naming `path` unless it is a JPEG that TensorFlow's decoder can read to its end.

    A cheap structural check run when the images are listed, so that a truncated or corrupt file ends
    in one line naming it instead of a `DecodeJpeg` op error inside tf.data: the start-of-image marker,
    the header segments up to the first scan (a frame header among them, each segment length inside the
    file) and an end-of-image marker after the scan. Entropy-coded data stuffs every 0xFF byte, so
    FF D9 there is the end-of-image marker; bytes after it are allowed (TensorFlow ignores them).
    """
    expected = "a complete JPEG image (copy it again, or remove it from the folder)"
    with open(path, "rb") as file:
        data_start = _jpeg_scan_start(file, path, expected)
        file.seek(0, 2)
        size = file.tell()
        file.seek(max(data_start, size - 64))
        tail = file.read().rstrip(b"\x00\r\n ")
        if tail.endswith(JPEG_END):
            return  # the usual file: ends with its end-of-image marker
        file.seek(data_start)
        require(JPEG_END in file.read(), path, "truncated JPEG (no end-of-image marker)", expected)


def _jpeg_scan_start(file, path, expected) -> int:
    """Walk the header segments from the start-of-image marker; return the offset after the first SOS."""
    require(file.read(2) == JPEG_START, path, "not a JPEG file (no start-of-image marker)", expected)
    has_frame = False
    while True:
        head = file.read(2)
        while head[:1] == b"\xff" and head[1:] == b"\xff":  # fill bytes before a marker
            head = head[1:] + file.read(1)
        require(len(head) == 2 and head[0] == 0xFF, path, "truncated or corrupt JPEG header", expected)
        marker = head[1]
        if marker in _STANDALONE_MARKERS:
            continue
        length_bytes = file.read(2)
        require(len(length_bytes) == 2, path, "truncated JPEG header", expected)
        length = int.from_bytes(length_bytes, "big")
        require(length >= 2, path, "corrupt JPEG header (segment length)", expected)
        start = file.tell()
        if file.seek(start + length - 2) != start + length - 2 or len(file.read(1)) != 1:
            raise InputError(path, "truncated JPEG header", expected)
        file.seek(start + length - 2)
        has_frame = has_frame or marker in _FRAME_MARKERS
        if marker == 0xDA:  # start of scan: the entropy-coded data follow
            require(has_frame, path, "corrupt JPEG header (no frame header before the scan)", expected)
            return file.tell()
        require(marker != 0xD9, path, "JPEG ends before its image data", expected)


def _lookup_rows(path, names, matrix, wanted, problem, expected) -> np.ndarray:
    lookup = dict(zip(names, matrix, strict=True))
    absent = [n for n in wanted if n not in lookup]
    require(not absent, path, problem.format(absent[0] if absent else ""), expected)
    return np.stack([lookup[n] for n in wanted])


def train_single_positives(root: Path, train_names, train_full, mode: str, seed: int) -> np.ndarray:
    """Observed positives of images_tr: manual (CSV) or random (generated once, saved and reused)."""
    if mode == "manual":
        path = root / MANUAL_CSV
        names, matrix = read_label_csv(path, one_positive=True)
        observed = _lookup_rows(
            path,
            names,
            matrix,
            train_names,
            "no row for training image {}",
            "a row for every image in images_tr/",
        )
    elif mode == "random":
        path = root / f"single_positive_labels_random_seed{seed}.csv"
        if not path.exists():
            observed = single_positives.single_positive_random(train_full, seed)
            write_label_csv(path, train_names, observed)
            return observed
        names, matrix = read_label_csv(path)
        observed = _lookup_rows(
            path,
            names,
            matrix,
            train_names,
            "rows do not cover images_tr/",
            "one row per training image (delete the file to regenerate it)",
        )
    else:
        raise InputError(
            "--single_positive",
            "dominant needs class area fractions, which AID does not have",
            "random or manual for AID",
        )
    single_positives.check_single_positives(observed, train_full, path)
    return observed


def load(data_dir, single_positive: str, seed: int, val_fraction: float) -> dict:
    """The three splits: `{"class_names", "train", "val", "test", "reader": "aid"}`.

    Each split is `{"sources": image paths, "full": labels}`, train and val also `"observed"`; the
    validation images are a seeded `val_fraction` of images_tr (AID has no validation split).
    """
    root = require_dir(data_dir, f"the AID-multilabel folder with images_tr/, images_test/ and {LABELS_CSV}")
    labels_csv = root / LABELS_CSV
    names, matrix = read_label_csv(labels_csv)
    train_images = list_images(require_dir(root / "images_tr", "images_tr/<SceneClass>/*.jpg"))
    test_images = list_images(require_dir(root / "images_test", "images_test/<SceneClass>/*.jpg"))
    labelled = dict(zip(names, matrix, strict=True))
    missing = [n for n in names if n not in train_images and n not in test_images]
    require(
        not missing,
        labels_csv,
        f"{len(missing)} row(s) have no image (first: {missing[0] if missing else ''})",
        "a .jpg in images_tr/ or images_test/ for every CSV row",
    )
    for stem, image_path in [*train_images.items(), *test_images.items()]:
        require(stem in labelled, image_path, f"image has no row in {LABELS_CSV}", "a label row")
        check_jpeg(image_path)
    train_names, test_names = sorted(train_images), sorted(test_images)
    train_full = np.stack([labelled[n] for n in train_names])
    train_observed = train_single_positives(root, train_names, train_full, single_positive, seed)

    order = np.random.default_rng(seed).permutation(len(train_names))
    num_val = round(val_fraction * len(train_names))
    val_rows, train_rows = np.sort(order[:num_val]), np.sort(order[num_val:])
    paths = [str(train_images[n]) for n in train_names]

    def part(rows):
        return {
            "sources": [paths[i] for i in rows],
            "full": train_full[rows],
            "observed": train_observed[rows],
        }

    return {
        "class_names": CLASSES,
        "train": part(train_rows),
        "val": part(val_rows),
        "test": {
            "sources": [str(test_images[n]) for n in test_names],
            "full": np.stack([labelled[n] for n in test_names]),
        },
        "reader": "aid",
    }


def decode_image(path, image_size: int):
    """JPEG -> float32 [0, 1] at image_size x image_size (bilinear with antialiasing), as TF ops."""
    import tensorflow as tf

    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return image / 255.0


# ---- demo data (the real layout, generated) ----

# Scene -> (classes nearly always present, classes sometimes present): the demo's labels co-occur as in
# AID, where a port shows dock, ship and sea together, and an image has several true labels of which
# training observes one.
DEMO_SCENES = {
    "Airport": (("airplane", "pavement"), ("bare-soil", "grass", "cars", "buildings")),
    "Beach": (("sand", "sea"), ("water", "trees", "buildings")),
    "Port": (("dock", "ship", "sea"), ("water", "buildings", "cars", "tanks")),
    "Residential": (("buildings", "cars", "trees"), ("pavement", "grass", "court", "mobile-home")),
    "Farmland": (("field", "grass"), ("bare-soil", "trees", "chaparral", "buildings")),
    "Industrial": (("buildings", "tanks", "pavement"), ("cars", "bare-soil", "water")),
}
DEMO_CORE_PROBABILITY, DEMO_OPTIONAL_PROBABILITY = 0.9, 0.4
DEMO_VERSION = 2  # written to demo.json; a folder written by another generator is refused, not reused


def demo_labels(num_images: int, rng) -> tuple[list[str], np.ndarray]:
    """(scene per image, (N, 17) labels): core classes with p 0.9, optional ones with p 0.4, at least two."""
    scenes, labels = [], np.zeros((num_images, len(CLASSES)), np.uint8)
    for i in range(num_images):
        scene = list(DEMO_SCENES)[i % len(DEMO_SCENES)]
        core, optional = DEMO_SCENES[scene]
        candidates = [*core, *optional]
        chance = [DEMO_CORE_PROBABILITY] * len(core) + [DEMO_OPTIONAL_PROBABILITY] * len(optional)
        present = [c for c, p in zip(candidates, chance, strict=True) if rng.random() < p]
        for name in rng.permutation(candidates):  # at least two true labels per image
            if len(present) < 2 and name not in present:
                present.append(str(name))
        labels[i, [CLASSES.index(c) for c in present]] = 1
        scenes.append(scene)
    return scenes, labels


def demo_label_pattern(label_index: int, size: int) -> np.ndarray:
    """A fixed stamp per class: its own hue, and stripes of a class-specific orientation and period."""
    import cv2

    hue = np.uint8(180 * label_index / len(CLASSES))
    colour = cv2.cvtColor(np.array([[[hue, 220, 230]]], np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.int32)
    y, x = np.mgrid[0:size, 0:size]
    period = 3 + label_index % 3
    texture = (((x if label_index % 2 else y) // period) % 2 == 0)[..., None]
    return np.where(texture, colour, colour // 3).astype(np.uint8)


def write_demo(root, num_images: int, seed: int, image_size: int = 64) -> Path:
    """AID-multilabel layout: each true label a textured stamp in its own cell of a 3 x 3 grid, so that
    every label is visible; returns the folder. Reused when this generator wrote it with these settings."""
    import cv2

    root = Path(root)
    settings = {"generator": DEMO_VERSION, "num_images": num_images, "seed": seed, "image_size": image_size}
    marker = root / "demo.json"
    if marker.exists() or (root / LABELS_CSV).exists():
        same = marker.exists() and json.loads(marker.read_text()) == settings
        found = marker.read_text().strip() if marker.exists() else f"{LABELS_CSV} but no demo.json"
        expected = f"a demo folder written with {settings} (delete the folder to regenerate it)"
        require(same and (root / MANUAL_CSV).exists(), root, f"holds other data ({found})", expected)
        return root
    rng = np.random.default_rng(seed)
    cell = image_size // 3
    patterns = [demo_label_pattern(c, cell) for c in range(len(CLASSES))]
    scenes, matrix = demo_labels(num_images, rng)
    names, manual = [], []
    for i, (scene, labels) in enumerate(zip(scenes, matrix, strict=True)):
        image = rng.normal(110, 12, size=(image_size, image_size, 3)).clip(0, 255).astype(np.uint8)
        present = np.flatnonzero(labels)
        cells = rng.permutation(9)[: present.size]
        areas = []
        for c, position in zip(present, cells, strict=True):
            scale = int(rng.integers(cell // 2, cell + 1))
            top, left = (position // 3) * cell, (position % 3) * cell
            top, left = (
                top + int(rng.integers(0, cell - scale + 1)),
                left + int(rng.integers(0, cell - scale + 1)),
            )
            image[top : top + scale, left : left + scale] = cv2.resize(patterns[c], (scale, scale))
            areas.append(scale * scale)
        split = "images_tr" if i % 4 else "images_test"
        name = f"{scene.lower()}_{i}"
        with atomic.atomic_path(root / split / scene / f"{name}.jpg") as temporary:
            cv2.imwrite(str(temporary), image[..., ::-1])
        chosen = np.zeros_like(labels)
        chosen[present[int(np.argmax(areas))]] = 1
        names.append(name)
        manual.append(chosen)
    training = [i for i in range(num_images) if i % 4]
    write_label_csv(root / MANUAL_CSV, [names[i] for i in training], [manual[i] for i in training])
    write_label_csv(root / LABELS_CSV, names, matrix)
    atomic.write_json(marker, settings)
    return root
