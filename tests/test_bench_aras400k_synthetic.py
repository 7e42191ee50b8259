"""bench/aras400k_synthetic.py at a tiny size: it runs end to end (one seed) and prints the paired
table of real + generated vs real and generated vs real, whose differences are the per-seed ones
(checked with the training replaced by known scores, so that every row's direction is pinned)."""

import json

import pytest
from conftest import call_main

from bench import aras400k_synthetic as bench


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench")
    # One setting and one seed (the low-data setting and the pairing are tested below without training).
    argv = f"""--patches 6 --image_size 32 --low_data 0 --seeds 1 --gan_epochs 1 --gan_batch_size 4
        --width_divisor 64 --decoder_width 8 --seg_epochs 1 --batch_size 4 --results_dir {results}"""
    return results, call_main(bench, argv)


def test_per_seed_values_of_every_setting_and_training_set(tiny_run):
    results, values = tiny_run
    assert json.loads((results / "per_seed.json").read_text()) == values
    assert list(values) == ["all real"]
    methods = values["all real"]
    assert list(methods) == ["real", "generated", "real+generated"]
    assert all(len(scores) == 1 and all(0 <= s <= 100 for s in scores) for scores in methods.values())
    assert len(list((results / "settings" / "all_real" / "gen" / "images").glob("*.png"))) == 6


def test_low_data_setting_keeps_few_real_patches_and_every_mask(tiny_run, tmp_path):
    results, _ = tiny_run
    setting = bench.setting_root(results / "data", tmp_path / "low", 2)
    assert len(list((setting / "train" / "images").glob("*.png"))) == 2
    assert len(list((setting / "train" / "masks").glob("*.png"))) == 2
    assert len(list((setting / "allmasks" / "masks").glob("*.png"))) == 6
    assert len(list((setting / "gen" / "masks").glob("*.png"))) == 6


def test_paired_table_has_one_row_per_pair_and_the_first_minus_the_second(tmp_path, monkeypatch, capsys):
    # Known macro F1 per (setting, training set, seed): the table must pair the seeds of each setting's
    # first set with the same seeds of its real set, in that direction.
    base = {"real": 50.0, "generated": 40.0, "real+generated": 53.0}
    trained = []

    def fake_segmentation(args, root, name, training_set, seed):
        trained.append((name, training_set, seed))
        offset = 10.0 if name == "2_real" else 0.0
        return {"macro_f1": (base[training_set] - offset + seed * (1 + (training_set == "generated"))) / 100}

    monkeypatch.setattr(bench, "train_gan_and_generate", lambda args, root, name: None)
    monkeypatch.setattr(bench, "train_segmentation", fake_segmentation)
    results = tmp_path / "bench"
    argv = f"--patches 6 --image_size 32 --low_data 2 --seeds 3 --results_dir {results}"
    values = call_main(bench, argv)
    assert sorted(trained) == sorted(
        (name, method, seed)
        for name in ("all_real", "2_real")
        for method in bench.TRAINING_SETS
        for seed in range(3)
    )
    assert values["2 real"]["generated"] == pytest.approx([30.0, 32.0, 34.0])
    table = (results / "paired.md").read_text().strip().splitlines()
    assert len(table) == 2 + 4  # header, separator, two pairs for each of the two settings
    expected = [
        ("all real", "real+generated", 3.0, "3/3"),
        ("all real", "generated", -9.0, "0/3"),
        ("2 real", "real+generated", 3.0, "3/3"),
        ("2 real", "generated", -9.0, "0/3"),
    ]
    for line, (setting, first, difference, wins) in zip(table[2:], expected, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:3] == [f"{setting}: {first} vs {setting}: real", "macro_f1", "3"]
        assert float(cells[3]) == pytest.approx(difference, abs=0.006)
        assert cells[5].startswith(wins)
    assert table[2] in capsys.readouterr().out
