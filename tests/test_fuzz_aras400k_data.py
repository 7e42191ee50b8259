"""Fuzz tests of the ARAS400k data scripts: the downloader, the dataset creator, the five captioners and
caption_stats. Each file argument gets an empty file, a truncated copy of a valid file and random bytes;
each numeric flag 0, -1 and 10**12. Every case ends in exit 0, or exit 2 with one error line, no
traceback and no new file in the results folder (conftest.assert_fuzz_outcome). All in-process."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import HUGE, assert_fuzz_outcome, call_main, corrupted_copies
from test_dataset_creator import land, make_pair
from test_dataset_downloader import served_products

import caption_stats
import dataset_creator
import dataset_downloader as dd
import gpt_captioner
import ollama_captioner
import text_captioner
import vision_captioner
import vision_language_captioner
from common.aras400k import captions

NUMBERS = (0, -1, HUGE)


def run_cases(capsys, module, cases):
    """`cases`: (name, argv, results folder). Runs them all; fails listing every case that broke."""
    broken = []
    for name, argv, results in cases:
        try:
            assert_fuzz_outcome(
                capsys, lambda argv=argv: call_main(module, [str(a) for a in argv]), results, name
            )
        except Exception as error:  # every broken case is listed
            broken.append(f"{name}: {str(error)[:400]}")
    assert not broken, "\n".join(broken)


def replaced(folder, valid, bad) -> Path:
    """A copy of the folder holding `valid` with `bad` in its place."""
    shutil.copytree(valid.parent, folder)
    shutil.copyfile(bad, folder / valid.name)
    return folder


# ---- dataset_creator.py ----


def test_fuzz_dataset_creator(tmp_path, capsys):
    pixels, codes = land(256, 256)
    s2_dir, map_dir = make_pair(tmp_path / "valid", "N36E027", pixels, codes)
    base = ["--split", "none", "--scaling", "percentile", "--percentile_windows", 4]
    cases = []
    for which, folder in (("s2", s2_dir), ("map", map_dir)):
        valid = next(folder.glob("*.tif"))
        for kind, bad in corrupted_copies(valid, tmp_path / f"bad_{which}"):
            case = tmp_path / f"{which}_{kind}"
            bad_dir = replaced(case / folder.name, valid, bad)
            dirs = (bad_dir, map_dir) if which == "s2" else (s2_dir, bad_dir)
            argv = ["--s2_dir", dirs[0], "--map_dir", dirs[1], "--out", case / "out", *base]
            cases.append((f"{which} tile {kind}", argv, case / "out"))
    flags = ("--patch_size", "--stride", "--max_water_fraction", "--max_reflectance")
    flags += ("--percentile_windows", "--workers", "--cache_mb")
    for flag in flags:
        for value in NUMBERS:
            out = tmp_path / f"{flag[2:]}_{value}"
            argv = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", out, *base, flag, value]
            cases.append((f"{flag} {value}", argv, out))
    for value in NUMBERS:
        out = tmp_path / f"percentiles_{value}"
        argv = ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", out, *base, "--percentiles", value, 98]
        cases.append((f"--percentiles {value} 98", argv, out))
    # --percentages MASK_DIR: a mask folder with a bad mask.
    finished = tmp_path / "finished"
    call_main(
        dataset_creator, ["--s2_dir", s2_dir, "--map_dir", map_dir, "--out", finished, "--split", "none"]
    )
    mask = next((finished / "masks").glob("*.png"))
    for kind, bad in corrupted_copies(mask, tmp_path / "bad_mask"):
        masks = replaced(tmp_path / f"masks_{kind}" / "masks", mask, bad)
        out = tmp_path / f"masks_{kind}" / "out"
        cases.append((f"mask {kind}", ["--percentages", masks, "--out", out / "p.csv"], out))
    run_cases(capsys, dataset_creator, cases)


# ---- dataset_downloader.py (the real client against the local catalogue) ----


def test_fuzz_dataset_downloader(tmp_path, capsys, monkeypatch):
    with dd.LocalCatalogue(served_products(tmp_path / "served"), username="a", password="pw") as local:
        monkeypatch.setenv("TERRASCOPE_USERNAME", "a")
        monkeypatch.setenv("TERRASCOPE_PASSWORD", "pw")
        config = local.write_config(tmp_path / "catalogue.ini")
        cases = []
        for kind, bad in corrupted_copies(config, tmp_path / "bad_config"):
            out = tmp_path / f"config_{kind}"
            cases.append((f"config {kind}", ["--catalogue_config", bad, "--out", out], out))
        done = tmp_path / "done"
        call_main(dd, ["--catalogue_config", config, "--out", done, "--collections", "map"])
        for kind, bad in corrupted_copies(done / dd.MANIFEST, tmp_path / "bad_manifest"):
            out = tmp_path / f"manifest_{kind}"
            out.mkdir()
            shutil.copyfile(bad, out / dd.MANIFEST)
            cases.append((f"manifest {kind}", ["--catalogue_config", config, "--out", out], out))
        for flag in ("--retries", "--backoff_s", "--bbox"):
            for value in NUMBERS:
                out = tmp_path / f"{flag[2:]}_{value}"
                values = [value] * (4 if flag == "--bbox" else 1)
                argv = ["--catalogue_config", config, "--out", out, "--collections", "map", flag, *values]
                cases.append((f"{flag} {value}", argv, out))
        run_cases(capsys, dd, cases)


# ---- the captioners ----


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two demo patches, their percentage CSV, and the tiny checkpoints."""
    root = tmp_path_factory.mktemp("fuzz_captions")
    torch.manual_seed(0)
    images, table = captions.demo_inputs(root / "patches", seed=0, train_images=2)
    return {
        "root": root,
        "images": images,
        "image": sorted(images.glob("*.png"))[0],
        "percentages": table,
        "qwen_vl": vision_language_captioner.make_demo_model(root / "qwen_vl"),
        "gemma": vision_captioner.make_demo_model(root / "gemma"),
        "qwen": text_captioner.make_demo_model(root / "qwen"),
    }


def file_cases(tmp_path, name, valid, make_argv):
    """A case per bad version of `valid`: make_argv(bad path, out csv) -> argv."""
    cases = []
    for kind, bad in corrupted_copies(valid, tmp_path / f"bad_{name}"):
        if name in ("images", "config"):
            bad = replaced(tmp_path / f"{name}_{kind}_folder", valid, bad)  # the folder holding it
            if name == "images":  # only the bad image in the folder: any new caption would be written
                for other in bad.glob("*.png"):
                    if other.name != valid.name:
                        other.unlink()
        out = tmp_path / f"{name}_{kind}" / "captions.csv"
        cases.append((f"{name} {kind}", make_argv(bad, out), out.parent))
    return cases


def number_cases(tmp_path, flags, make_argv):
    cases = []
    for flag in flags:
        for value in NUMBERS:
            out = tmp_path / f"{flag[2:]}_{value}" / "captions.csv"
            cases.append((f"{flag} {value}", [*make_argv(out), flag, value], out.parent))
    return cases


SHARED_FLAGS = ("--num_captions", "--retries", "--seed")


def test_fuzz_vision_captioner(inputs, tmp_path, capsys):
    def argv(images, model, out):
        return ["--model", model, "--images", images, "--out", out, "--max_new_tokens", 2]

    cases = file_cases(tmp_path, "images", inputs["image"], lambda bad, out: argv(bad, inputs["gemma"], out))
    config = inputs["gemma"] / "config.json"
    cases += file_cases(tmp_path, "config", config, lambda bad, out: argv(inputs["images"], bad, out))
    flags = (*SHARED_FLAGS, "--batch_size", "--max_new_tokens")
    cases += number_cases(tmp_path, flags, lambda out: argv(inputs["images"], inputs["gemma"], out))
    run_cases(capsys, vision_captioner, cases)


def test_fuzz_vision_language_captioner(inputs, tmp_path, capsys):
    def argv(images, table, model, out):
        return [
            "--model",
            model,
            "--images",
            images,
            "--percentages",
            table,
            "--out",
            out,
            "--max_new_tokens",
            2,
        ]

    valid = (inputs["images"], inputs["percentages"], inputs["qwen_vl"])
    cases = file_cases(tmp_path, "images", inputs["image"], lambda bad, out: argv(bad, *valid[1:], out))
    cases += file_cases(
        tmp_path, "percentages", inputs["percentages"], lambda bad, out: argv(valid[0], bad, valid[2], out)
    )
    config = inputs["qwen_vl"] / "config.json"
    cases += file_cases(tmp_path, "config", config, lambda bad, out: argv(*valid[:2], bad, out))
    flags = (*SHARED_FLAGS, "--batch_size", "--max_new_tokens", "--workers")
    cases += number_cases(tmp_path, flags, lambda out: argv(*valid, out))
    run_cases(capsys, vision_language_captioner, cases)


def test_fuzz_text_captioner(inputs, tmp_path, capsys):
    def argv(table, model, out):
        return ["--model", model, "--percentages", table, "--out", out, "--max_new_tokens", 2]

    cases = file_cases(
        tmp_path, "percentages", inputs["percentages"], lambda bad, out: argv(bad, inputs["qwen"], out)
    )
    config = inputs["qwen"] / "config.json"
    cases += file_cases(tmp_path, "config", config, lambda bad, out: argv(inputs["percentages"], bad, out))
    flags = (*SHARED_FLAGS, "--batch_size", "--max_new_tokens", "--temperature", "--top_p")
    cases += number_cases(tmp_path, flags, lambda out: argv(inputs["percentages"], inputs["qwen"], out))
    run_cases(capsys, text_captioner, cases)


def test_fuzz_gpt_captioner(inputs, tmp_path, capsys):
    def argv(table, out):
        return ["--percentages", table, "--out", out, "--dry_run"]

    cases = file_cases(tmp_path, "percentages", inputs["percentages"], argv)
    flags = (*SHARED_FLAGS, "--max_requests_per_file", "--poll_seconds", "--max_wait", "--temperature")
    cases += number_cases(tmp_path, flags, lambda out: argv(inputs["percentages"], out))
    # The files a re-run reads: the caption CSV (with its settings record) and the batch record.
    done = tmp_path / "done" / "captions.csv"
    done.parent.mkdir()
    log = captions.CaptionLog(
        done, {"model": "gpt-4o-mini", "temperature": 1.0, "prompt": "gpt_percentages"}, 1
    )
    name = next(iter(captions.read_percentages(inputs["percentages"])))
    log.append(
        [{"filename": name, "caption": "a caption", "model": "gpt-4o-mini", "prompt_id": "gpt_percentages"}]
    )
    gpt_captioner.state_path(done).write_text('{"batches": []}')
    for valid in (done, gpt_captioner.state_path(done)):
        for kind, bad in corrupted_copies(valid, tmp_path / f"bad_{valid.name}"):
            out = tmp_path / f"{valid.name}_{kind}" / "captions.csv"
            shutil.copytree(done.parent, out.parent)
            shutil.copyfile(bad, out.parent / valid.name)
            cases.append((f"{valid.name} {kind}", argv(inputs["percentages"], out), out.parent))
    run_cases(capsys, gpt_captioner, cases)


def test_fuzz_ollama_captioner(inputs, tmp_path, capsys):
    def argv(images, table, out):
        return ["--images", images, "--percentages", table, "--out", out, "--dry_run"]

    valid = (inputs["images"], inputs["percentages"])
    cases = file_cases(tmp_path, "images", inputs["image"], lambda bad, out: argv(bad, valid[1], out))
    cases += file_cases(
        tmp_path, "percentages", inputs["percentages"], lambda bad, out: argv(valid[0], bad, out)
    )
    flags = (*SHARED_FLAGS, "--batch_size", "--timeout")
    cases += number_cases(tmp_path, flags, lambda out: argv(*valid, out))
    run_cases(capsys, ollama_captioner, cases)


# ---- caption_stats.py ----


def test_fuzz_caption_stats(tmp_path, capsys):
    call_main(caption_stats, ["--demo", "--results_dir", tmp_path / "demo"])
    data = tmp_path / "demo" / "demo_data" / "caption_stats"
    csvs = sorted(data.glob("*.csv"))
    images, table = data / "patches" / "train" / "images", next(data.rglob("class_percentages/train.csv"))
    clip = data / "clip"
    valid = {"captions": csvs[0], "percentages": table, "images": images, "clip": clip}

    def argv(results, **changed):
        chosen = {**valid, **changed}
        return ["--results_dir", results, *(f for key, value in chosen.items() for f in (f"--{key}", value))]

    cases = []
    for key, valid_file in (
        ("captions", csvs[0]),
        ("percentages", table),
        ("images", sorted(images.glob("*.png"))[0]),
        ("clip", clip / "config.json"),
    ):
        for kind, bad in corrupted_copies(valid_file, tmp_path / f"bad_{key}"):
            if key in ("images", "clip"):
                bad = replaced(tmp_path / f"{key}_{kind}", valid_file, bad)
            results = tmp_path / f"{key}_{kind}_results"
            cases.append((f"{key} {kind}", argv(results, **{key: bad}), results))
    for flag in ("--batch_size", "--seed"):
        for value in NUMBERS:
            results = tmp_path / f"{flag[2:]}_{value}"
            cases.append((f"{flag} {value}", [*argv(results), flag, value], results))
    run_cases(capsys, caption_stats, cases)
