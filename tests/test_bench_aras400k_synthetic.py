"""bench/aras400k_synthetic.py at a tiny size: it runs end to end and prints the paired table of
real + generated vs real and generated vs real, whose differences are the per-seed ones."""

import json

import numpy as np
import pytest
from conftest import call_main

from bench import aras400k_synthetic as bench


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench")
    # One setting (the low-data one is built by setting_root, tested below without training).
    argv = f"""--patches 6 --image_size 32 --low_data 0 --seeds 2 --gan_epochs 1 --gan_batch_size 4
        --width_divisor 64 --decoder_width 8 --seg_epochs 1 --batch_size 4 --results_dir {results}"""
    return results, call_main(bench, argv)


def test_per_seed_values_of_every_setting_and_training_set(tiny_run):
    results, values = tiny_run
    assert json.loads((results / "per_seed.json").read_text()) == values
    assert list(values) == ["all real"]
    methods = values["all real"]
    assert list(methods) == ["real", "generated", "real+generated"]
    assert all(len(scores) == 2 and all(0 <= s <= 100 for s in scores) for scores in methods.values())
    assert len(list((results / "settings" / "all_real" / "gen" / "images").glob("*.png"))) == 6


def test_low_data_setting_keeps_few_real_patches_and_every_mask(tiny_run, tmp_path):
    results, _ = tiny_run
    setting = bench.setting_root(results / "data", tmp_path / "low", 2)
    assert len(list((setting / "train" / "images").glob("*.png"))) == 2
    assert len(list((setting / "train" / "masks").glob("*.png"))) == 2
    assert len(list((setting / "allmasks" / "masks").glob("*.png"))) == 6
    assert len(list((setting / "gen" / "masks").glob("*.png"))) == 6


def test_paired_table_has_one_row_per_pair_and_the_first_minus_the_second(tiny_run, capsys):
    results, values = tiny_run
    table = (results / "paired.md").read_text().strip().splitlines()
    assert len(table) == 2 + 2  # header, separator, two pairs of the one setting the fixture runs
    for line, (setting, first) in zip(
        table[2:], [("all real", "real+generated"), ("all real", "generated")], strict=True
    ):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert (
            cells[0] == f"{setting}: {first} vs {setting}: real"
            and cells[1] == "macro_f1"
            and cells[2] == "2"
        )
        expected = np.mean(np.subtract(values[setting][first], values[setting]["real"]))
        assert float(cells[3]) == pytest.approx(expected, abs=0.006)
