"""caption_stats: the text statistics on a hand-made CSV with known answers, CLIPScore against CLIP's own
forward pass, and the demo's files."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import call_main

import caption_stats
from common.aras400k import captions, classes

NONE = dict.fromkeys(classes.CLASS_NAMES, 0.0)
PERCENTAGES = {
    "a.png": {**NONE, "Tree": 60.0, "Water": 40.0},
    "b.png": {**NONE, "Cropland": 70.0, "Built-up": 30.0},
}
ROWS = [
    {"filename": "a.png", "caption": "A dense forest next to a lake."},  # dominant yes, absent no
    {"filename": "a.png", "caption": "a dense FOREST, next to a lake"},  # repeats the first (normalised)
    {"filename": "b.png", "caption": "Urban blocks among trees."},  # not dominant; Tree is absent in b
    {"filename": "b.png", "caption": "Agricultural fields."},  # dominant (Cropland)
    {"filename": "c.png", "caption": "A dense forest next to a lake."},  # no percentages; repeats row 1
]


def test_class_terms_cover_the_classes():
    assert set(caption_stats.CLASS_TERMS) == set(classes.CLASS_NAMES)
    assert caption_stats.named_classes("Built-up areas by a river; no trees.") == {
        "Built-up",
        "Water",
        "Tree",
    }
    assert caption_stats.named_classes("the streetcar and grassy") == set()  # whole words only


def test_statistics_of_a_hand_made_csv():
    assert caption_stats.redundancy(ROWS) == (40.0, 20.0)
    dominant, absent, scored = caption_stats.grounding(ROWS, PERCENTAGES)
    assert (dominant, absent, scored) == (75.0, 25.0, 4)
    stats = caption_stats.length_and_vocabulary(ROWS)
    assert stats["words_mean"] == pytest.approx((7 + 7 + 4 + 2 + 7) / 5)
    assert stats["words_median"] == 7
    # a dense forest next to lake urban blocks among trees agricultural fields
    assert stats["vocabulary"] == 12
    # Bigrams: 6 in each of the three forest captions (the same 6), 3 + 1 in the others.
    assert stats["distinct_2"] == pytest.approx((6 + 3 + 1) / (3 * 6 + 3 + 1))


def test_clipscore_is_100_times_the_clipped_cosine_of_clip(tmp_path):
    torch.manual_seed(0)
    folder = caption_stats.make_demo_clip(tmp_path / "clip")
    images, _ = captions.demo_inputs(tmp_path / "patches", seed=0, train_images=4)
    names = captions.list_images(images)[:3]
    rows = [
        {"filename": name, "caption": text}
        for name, text in zip(names, ["tree", "water lake", "a"], strict=True)
    ]
    clip = caption_stats.load_clip(folder, torch.device("cpu"))
    scores = caption_stats.clip_scores(rows, images, clip, 2, torch.device("cpu"))
    model, tokenizer, processor = clip
    from PIL import Image

    pixels = processor([Image.open(images / n).convert("RGB") for n in names], return_tensors="pt")
    text = tokenizer([row["caption"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**text, **pixels)
    # CLIP's logits are exp(logit_scale) * cosine for every image-text pair; we need the diagonal.
    cosine = torch.diagonal(output.logits_per_image) / model.logit_scale.exp().detach()
    np.testing.assert_allclose(scores, 100 * cosine.clamp(min=0).numpy(), rtol=1e-5, atol=1e-5)


def test_demo_writes_the_table_and_plot(tmp_path):
    table = call_main(caption_stats, f"--demo --results_dir {tmp_path}")
    out = tmp_path / "caption_stats" / "demo"
    assert {p.name for p in out.iterdir()} >= {"stats.csv", "stats.md", "metrics.json", "stats.png"}
    grounded, generic = table
    assert grounded["names_dominant_pct"] == 100.0 and np.isfinite(grounded["clipscore"])
    with open(out / "stats.csv") as file:
        assert len(list(csv.DictReader(file))) == 2
    assert json.loads((out / "metrics.json").read_text())["csvs"][1]["captions"] == generic["captions"]
