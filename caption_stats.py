"""Caption quality of ARAS400k caption CSVs: redundancy, CLIPScore, grounding, length and vocabulary.

Paper: M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language Models",
arXiv 2603.09625 (ARAS400k). The poster reports 12.85 % redundancy over all captions and a
CLIPScore of 29.66; neither the paper nor the repository says how redundancy was computed, so this
script states its definitions and adds what no reference reports: whether a caption is grounded in
the patch's land-cover percentages. Per caption CSV (`common.aras400k.captions.CAPTION_COLUMNS`):

- redundancy_pct: captions that repeat an earlier caption of the same CSV, in percent, after
  normalisation (lower case, words only: `a forest, near WATER.` = `a forest near water`);
- repeat_within_image_pct: captions that repeat an earlier caption of the same image;
- clipscore: mean over captions of 100 * max(cos(CLIP image embedding, CLIP text embedding), 0)
  (Hessel et al. 2021 without their 2.5 weight, the torchmetrics convention), text truncated to
  CLIP's 77 tokens; needs --clip, a local CLIP folder (e.g. openai/clip-vit-base-patch32);
- names_dominant_pct: captions naming the class with the largest share (any of them on a tie);
- names_absent_pct: captions naming at least one class at 0 % in the patch;
  a class is "named" when a word of `CLASS_TERMS` occurs (whole words, any case);
- words_mean, words_median, vocabulary (distinct words), distinct_2 (distinct word bigrams / bigrams).

Commands:

    python caption_stats.py --captions ARAS400k_synth_vision_language_qwen3_vl_8b.csv \
        --percentages ARAS400k/class_percentages/synth.csv --images ARAS400k/synth/images \
        --clip ./clip-vit-base-patch32
    python caption_stats.py --demo

Outputs in <results_dir>/caption_stats/<run_name> (default results/caption_stats/run): stats.csv and
stats.md (one row per CSV), metrics.json, stats.png. The demo scores two hand-written seeded caption
CSVs of the demo patches with a tiny randomly initialised CLIP
(its CLIPScores mean nothing) and prints the markdown table.
"""

import argparse
import csv
import itertools
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from common import atomic, cli, plots, reports, runs
from common.aras400k import captions
from common.errors import InputError, cli_entry, require, require_file

# Words that name each class in a caption (whole words, any case).
CLASS_TERMS = {
    "Tree": ("tree", "trees", "forest", "forests", "forested", "woodland", "woodlands", "wooded"),
    "Shrubland": ("shrub", "shrubs", "shrubland", "shrublands", "bush", "bushes", "scrub", "scrubland"),
    "Grassland": ("grass", "grasses", "grassland", "grasslands", "meadow", "meadows", "pasture", "pastures"),
    "Cropland": (
        "crop",
        "crops",
        "cropland",
        "croplands",
        "farmland",
        "farmlands",
        "agricultural",
        "agriculture",
    ),
    "Built-up": ("built-up", "urban", "building", "buildings", "settlement", "settlements", "city", "town"),
    "Bare/sparse": ("bare", "barren", "sparse", "desert", "rocky", "sand", "sandy"),
    "Water": ("water", "river", "rivers", "lake", "lakes", "sea", "reservoir", "pond", "coastline"),
}
COLUMNS = [
    "captions_csv",
    "captions",
    "images",
    "redundancy_pct",
    "repeat_within_image_pct",
    "clipscore",
    "names_dominant_pct",
    "names_absent_pct",
    "grounded_captions",
    "words_mean",
    "words_median",
    "vocabulary",
    "distinct_2",
]
WORD = re.compile(r"[a-z0-9]+(?:[-/][a-z0-9]+)*")
CLASS_PATTERNS = {
    name: re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, terms)) + r")(?![\w-])")
    for name, terms in CLASS_TERMS.items()
}


def get_args_parser():
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--captions", default="", help="Comma-separated caption CSVs (filename, caption, ...).")
    add("--percentages", default="ARAS400k/class_percentages/synth.csv", help="Class-percentage CSV.")
    add("--images", default="", help="Image folder (needed for CLIPScore).")
    add("--clip", default="", help="Local CLIP folder for CLIPScore (empty: CLIPScore is not computed).")
    add("--batch_size", type=int, default=64, help="Caption-image pairs per CLIP forward pass.")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Device of the CLIP model.")
    add("--results_dir", default="results", help="Root of the output tree.")
    add(
        "--run_name",
        default="run",
        help="The tables, metrics and plot go to <results_dir>/caption_stats/<run_name>.",
    )
    add("--out_dir", default="", help=argparse.SUPPRESS)  # the old name of the whole output folder
    add("--seed", type=int, default=0, help="Seeds the demo data and demo CLIP.")
    cli.add_demo_argument(parser, "(two hand-written caption CSVs, a tiny random CLIP; seconds).")
    return parser


# ---- the text statistics ----


def normalise(caption: str) -> str:
    """Lower case, words only, single spaces: the form in which captions are compared."""
    return " ".join(WORD.findall(caption.lower()))


def redundancy(rows) -> tuple[float, float]:
    """Percent of captions equal (normalised) to an earlier one: in the whole CSV, and of the same image."""
    seen, seen_per_image = set(), set()
    repeats = repeats_within = 0
    for row in rows:
        text = normalise(row["caption"])
        repeats += text in seen
        repeats_within += (row["filename"], text) in seen_per_image
        seen.add(text)
        seen_per_image.add((row["filename"], text))
    return 100.0 * repeats / len(rows), 100.0 * repeats_within / len(rows)


def named_classes(caption: str) -> set[str]:
    """The classes a caption names (a word of `CLASS_TERMS`)."""
    lowered = caption.lower()
    return {name for name, pattern in CLASS_PATTERNS.items() if pattern.search(lowered)}


def grounding(rows, percentages) -> tuple[float, float, int]:
    """Percent of captions naming the dominant class, naming an absent class, and how many were scored."""
    dominant = absent = scored = 0
    for row in rows:
        shares = percentages.get(row["filename"])
        if shares is None:
            continue
        scored += 1
        named = named_classes(row["caption"])
        top = max(shares.values())
        dominant += bool(named & {name for name, value in shares.items() if value == top and top > 0})
        absent += bool(named & {name for name, value in shares.items() if value == 0})
    if not scored:
        return float("nan"), float("nan"), 0
    return 100.0 * dominant / scored, 100.0 * absent / scored, scored


def length_and_vocabulary(rows) -> dict:
    """Words per caption (mean, median), distinct words, and distinct word bigrams / all bigrams."""
    words = [WORD.findall(row["caption"].lower()) for row in rows]
    bigrams = [pair for caption in words for pair in itertools.pairwise(caption)]
    return {
        "words_mean": float(np.mean([len(caption) for caption in words])),
        "words_median": float(statistics.median(len(caption) for caption in words)),
        "vocabulary": len({word for caption in words for word in caption}),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else float("nan"),
    }


# ---- CLIPScore ----


def load_clip(folder, device):
    """A local CLIP checkpoint: model, tokenizer and (PIL) image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = captions.load_pretrained(CLIPModel, folder, "CLIP model")
    tokenizer = captions.load_pretrained(AutoTokenizer, folder, "CLIP tokenizer")
    image_processor = captions.load_pretrained(
        AutoImageProcessor, folder, "CLIP image processor", backend="pil"
    )
    return model.to(device).eval(), tokenizer, image_processor


def clip_scores(rows, images_dir, clip, batch_size: int, device) -> np.ndarray:
    """100 * max(cos(image, caption), 0) per row, CLIP's projected embeddings."""
    import torch

    model, tokenizer, image_processor = clip
    max_length = min(model.config.text_config.max_position_embeddings, 77)
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images = [load_image(Path(images_dir) / row["filename"]) for row in batch]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        text = tokenizer(
            [row["caption"] for row in batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            image_embeddings = _embedding(model.get_image_features(pixel_values=pixels))
            text_embeddings = _embedding(model.get_text_features(**text))
        cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=-1)
        scores.append((100.0 * cosine.clamp(min=0)).cpu().numpy())
    return np.concatenate(scores)


def load_image(path):
    """An RGB image; a missing or unreadable one is one error line naming it."""
    from PIL import Image

    try:
        with Image.open(require_file(path, "the image a caption CSV names")) as image:
            return image.convert("RGB")
    except OSError as error:  # PIL's unreadable and truncated images
        raise InputError(path, f"cannot be read ({error})", "a PNG image") from None


def _embedding(output):
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if hasattr(output, "shape") else output.pooler_output


# ---- one CSV ----


def read_captions(path) -> list[dict]:
    """Read a caption CSV (`CAPTION_COLUMNS`; extra columns kept) as a list of dicts."""
    path = require_file(path, "a caption CSV (filename, caption, model, prompt_id)")
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            lacking = [name for name in ("filename", "caption") if name not in (reader.fieldnames or [])]
            require(
                not lacking,
                path,
                f"lacks the column(s) {', '.join(lacking)}",
                ",".join(captions.CAPTION_COLUMNS),
            )
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(
            path, f"is not a readable CSV ({type(error).__name__})", "a UTF-8 caption CSV"
        ) from None
    require(
        all(isinstance(row.get("caption"), str) for row in rows), path, "has a cut-off row", "complete rows"
    )
    return rows


def csv_stats(path, percentages, args, clip, device) -> dict:
    rows = [row for row in read_captions(path) if row["caption"] is not None]
    require(rows, path, "has no captions", "at least one caption row")
    redundant, within = redundancy(rows)
    dominant, absent, scored = grounding(rows, percentages)
    stats = {
        "captions_csv": Path(path).name,
        "captions": len(rows),
        "images": len({row["filename"] for row in rows}),
        "redundancy_pct": redundant,
        "repeat_within_image_pct": within,
        "clipscore": float("nan"),
        "names_dominant_pct": dominant,
        "names_absent_pct": absent,
        "grounded_captions": scored,
        **length_and_vocabulary(rows),
    }
    if clip is not None:
        missing = [row["filename"] for row in rows if not (Path(args.images) / row["filename"]).is_file()]
        require(
            not missing,
            args.images,
            f"lacks {len(missing)} image(s) of {path}, e.g. {missing[:1]}",
            "every image",
        )
        stats["clipscore"] = float(clip_scores(rows, args.images, clip, args.batch_size, device).mean())
    return stats


def markdown(table) -> str:
    header = [
        "captions CSV",
        "captions",
        "redundancy %",
        "same-image repeats %",
        "CLIPScore",
        "names dominant %",
        "names absent %",
        "words (mean / median)",
        "vocabulary",
        "distinct-2",
    ]
    rows = [
        [
            row["captions_csv"],
            row["captions"],
            f"{row['redundancy_pct']:.2f}",
            f"{row['repeat_within_image_pct']:.2f}",
            "not computed" if np.isnan(row["clipscore"]) else f"{row['clipscore']:.2f}",
            f"{row['names_dominant_pct']:.2f}",
            f"{row['names_absent_pct']:.2f}",
            f"{row['words_mean']:.1f} / {row['words_median']:.0f}",
            row["vocabulary"],
            f"{row['distinct_2']:.3f}",
        ]
        for row in table
    ]
    return reports.markdown_table(header, rows)


def plot(table, path) -> None:
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(table) + 3), 3.6))
    metrics = {
        "redundancy %": "redundancy_pct",
        "names dominant %": "names_dominant_pct",
        "names absent %": "names_absent_pct",
    }
    series = {label: ([row[key] for row in table], [0.0] * len(table)) for label, key in metrics.items()}
    plots.grouped_bars(axis, [row["captions_csv"] for row in table], series)
    axis.set_ylabel("% of captions")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8)
    axis.tick_params(axis="x", labelsize=7, rotation=15)
    plots.save(figure, path)


# ---- demo ----


def demo_captions(folder, images_dir, percentages, seed: int) -> list[Path]:
    """Two seeded caption CSVs of the demo patches: one naming the largest classes, one generic."""
    rng = np.random.default_rng(seed)
    names = captions.list_images(images_dir)
    grounded, generic = [], []
    for name in names:
        ranked = sorted(percentages[name], key=lambda cls: -percentages[name][cls])
        first, second = CLASS_TERMS[ranked[0]][0], CLASS_TERMS[ranked[1]][0]
        grounded.append(f"A patch dominated by {first} with some {second}.")
        generic.append(
            ["A rural landscape.", "Fields and a river.", "A town near a forest."][rng.integers(3)]
        )
    paths = []
    for label, texts in (("grounded", grounded), ("generic", generic)):
        path = Path(folder) / f"{label}_captions.csv"
        rows = [
            {"filename": name, "caption": text, "model": f"demo-{label}", "prompt_id": "demo"}
            for name, text in zip(names, texts, strict=True)
        ]
        atomic.write_csv(path, rows, captions.CAPTION_COLUMNS)
        paths.append(path)
    return paths


def make_demo_clip(folder) -> Path:
    """A tiny randomly initialised CLIPModel with a BPE tokenizer and a PIL image processor."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = captions.demo_tokenizer(
        ["<|startoftext|>", "<|endoftext|>"], "", bos_token="<|startoftext|>", eos_token="<|endoftext|>"
    )
    tokenizer.pad_token = "<|endoftext|>"
    # Like CLIP's tokenizer: every text is wrapped in start and end tokens (CLIP pools at the end token).
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return Path(folder)


def output_folder(args) -> Path:
    """<results_dir>/caption_stats/<run_name>, or the folder of the old --out_dir flag (with a note)."""
    if args.out_dir:
        print(
            "note: --out_dir is now --results_dir/--run_name; the old name goes in a later release",
            file=sys.stderr,
        )
        return Path(args.out_dir)
    return Path(args.results_dir) / "caption_stats" / args.run_name


@cli_entry
def main(args):
    if args.demo:
        import torch

        torch.manual_seed(args.seed)
        folder = Path(args.results_dir) / "demo_data" / "caption_stats"
        images_dir, percentages_csv = captions.demo_inputs(folder / "patches", args.seed)
        args.images, args.percentages = str(images_dir), str(percentages_csv)
        paths = demo_captions(folder, images_dir, captions.read_percentages(percentages_csv), args.seed)
        args.captions = ",".join(map(str, paths))
        args.clip = str(make_demo_clip(folder / "clip"))
        args.run_name = "demo"
    runs.print_args(args)
    require(args.batch_size >= 1, "--batch_size", f"is {args.batch_size}", "at least 1")
    paths = [path for path in args.captions.split(",") if path]
    require(paths, "--captions", "is empty", "one or more caption CSVs, comma-separated")

    # ---- inputs ----
    percentages = captions.read_percentages(args.percentages)
    clip, device = None, None
    if args.clip:
        require(args.images, "--images", "is empty but --clip is set", "the image folder for CLIPScore")
        device, _ = captions.torch_device_and_dtype(args.device, "float32")
        clip = load_clip(args.clip, device)
    else:
        print("no --clip folder: CLIPScore is not computed")

    # ---- statistics ----
    table = [csv_stats(path, percentages, args, clip, device) for path in paths]
    out_dir = output_folder(args)
    text = markdown(table)
    reports.write_table(out_dir / "stats", table, COLUMNS, text)
    atomic.write_json(
        out_dir / "metrics.json", {"csvs": table, "class_terms": CLASS_TERMS, **runs.run_record(args)}
    )
    plot(table, out_dir / "stats.png")
    print(text, end="")
    print(f"wrote {out_dir / 'stats.md'}, stats.csv, metrics.json, stats.png")
    if any(row["grounded_captions"] < row["captions"] for row in table):
        print("note: captions of images without a percentage row are left out of the grounding figures")
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
