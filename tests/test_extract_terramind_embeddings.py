"""extract_terramind_embeddings.py: its Keras TerraMind v1 encoder equals the PyTorch reference
fixture, bands and scaling, strict checkpoint checks, token order, resume, demo."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_main_error, call_main, no_temporary_files
from fixtures import make_terramind_fixture as reference

import extract_terramind_embeddings as extractor
from common.errors import InputError
from common.lucas import lucas_chips
from common.raster import write_geotiff

pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STEM = "extract_terramind_embeddings"
# tests/fixtures/make_terramind_fixture.py CONFIGS, as EncoderConfig.
FIXTURE_CONFIGS = {
    "gelu": extractor.EncoderConfig(dim=16, depth=2, num_heads=2, bias=True, gated_mlp=False),
    "swiglu": extractor.EncoderConfig(dim=16, depth=2, num_heads=2, bias=False, gated_mlp=True),
}


def make_chips(root, counts=(4, 3, 3), size=32, seed=0):
    """Tiny 6-band reflectance chips <root>/<STR18>/<Point_ID>.tif and chips_LC_class.csv, ids not sorted."""
    rng = np.random.default_rng(seed)
    lines, point_ids = ["Point_ID,STR18"], rng.permutation(np.arange(5000, 5000 + sum(counts)))
    labels = np.repeat(np.arange(len(counts)), counts)
    for point_id, label in zip(point_ids, labels, strict=True):
        chip = rng.uniform(0.0, 0.4, (6, size, size)).astype(np.float32)
        write_geotiff(Path(root) / str(label + 1) / f"{point_id}.tif", chip)
        lines.append(f"{point_id},{label + 1}")
    (Path(root) / "chips_LC_class.csv").write_text("\n".join(lines) + "\n")
    return Path(root)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return extractor.write_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "TerraMind_v1_tiny.safetensors", "tiny"
    )


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return make_chips(tmp_path_factory.mktemp("chips"))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, chips, tiny_checkpoint):
    results = tmp_path_factory.mktemp("results")
    argv = f"--data_root {chips} --checkpoint {tiny_checkpoint} --variant tiny --save_mean --batch_size 4"
    run_dir = call_main(extractor, f"{argv} --results_dir {results}")
    return run_dir, argv


@pytest.mark.parametrize("name", ["gelu", "swiglu"])
def test_keras_encoder_equals_the_reference_fixture(name):
    config = FIXTURE_CONFIGS[name]
    state = extractor.read_checkpoint(FIXTURES / f"terramind_{name}.safetensors")
    with np.load(FIXTURES / f"terramind_{name}.npz") as reference:
        for size in (64, 32):  # the position grid's own size, and interpolated
            chips = np.transpose(reference[f"inputs_{size}"], (0, 2, 3, 1))
            for layer in range(config.depth):
                model = extractor.build_encoder(config, size, 6, layer)
                extractor.assign_weights(model, state, extractor.BAND_MAPPINGS["correct"], size)
                expected = reference[f"tokens_{size}_layer{layer}"]
                np.testing.assert_allclose(np.asarray(model(chips)), expected, atol=1e-4, rtol=0)


def test_bicubic_matrix_equals_torch_interpolate():
    grid = torch.randn((1, 3, 14, 14), dtype=torch.float64)
    for size in (2, 5, 16):
        expected = torch.nn.functional.interpolate(
            grid, size=(size, size), mode="bicubic", align_corners=False
        )
        matrix = extractor.bicubic_matrix(14, size)
        np.testing.assert_allclose(
            np.einsum("ai,bj,ncij->ncab", matrix, matrix, grid.numpy()), expected, atol=1e-12
        )


def test_band_mapping_and_scaling_against_hand_values():
    chip = np.full((1, 1, 1, 6), [0.1234, 0.2, 0.05, 0.3, 0.25, 0.15], np.float32)
    bands, scale, mean, std = extractor.band_preprocessing("correct", "pretraining")
    assert bands == ["RED", "GREEN", "BLUE", "NIR_BROAD", "SWIR_1", "SWIR_2"] and scale == 10000
    value = extractor.standardise(chip, scale, mean, std)[0, 0, 0]
    # B4 = RED (mean 1853.91, std 2134.138), B2 = BLUE (1503.317, 2141.107), B8 = NIR_BROAD.
    expected = [(1234 - 1853.91) / 2134.138, (500 - 1503.317) / 2141.107, (3000 - 3083.234) / 1871.918]
    np.testing.assert_allclose(value[[0, 2, 3]], expected, rtol=1e-5)
    bands, scale, mean, std = extractor.band_preprocessing("study", "pretraining")
    value = extractor.standardise(chip, scale, mean, std)[0, 0, 0]
    # The study: B4 read as BLUE, B2 as RED, B8 as NIR_NARROW (mean 3132.22, std 1753.829).
    expected = [(1234 - 1503.317) / 2141.107, (500 - 1853.91) / 2134.138, (3000 - 3132.22) / 1753.829]
    np.testing.assert_allclose(value[[0, 2, 3]], expected, rtol=1e-5)
    bands, scale, mean, std = extractor.band_preprocessing("correct", "dataset", [0.1] * 6, [0.05] * 6)
    np.testing.assert_allclose(
        extractor.standardise(chip, scale, mean, std)[0, 0, 0, 0], (0.1234 - 0.1) / 0.05, 1e-5
    )
    # Patch-embedding columns: pixel-major, band-minor; each chip channel gets its band's column.
    pixels, pretrained = 256, extractor.PRETRAINED_BANDS
    weight = np.array([[100 * band + pixel for pixel in range(pixels) for band in range(12)]], np.float32)
    picked = extractor.select_patch_bands(weight, bands).reshape(pixels, 6)
    assert (
        picked[7].tolist()
        == [100 * pretrained.index(band) + 7 for band in bands]
        == [307, 207, 107, 707, 1007, 1107]
    )


def test_dataset_statistics_are_all_chips_pixels(chips):
    point_ids, labels = lucas_chips.read_labels(chips / "chips_LC_class.csv")
    paths, _ = lucas_chips.locate_chips(chips, chips / "chips_LC_class.csv", point_ids, labels)
    import rasterio

    pixels = np.concatenate([rasterio.open(path).read().reshape(6, -1) for path in paths], axis=1)
    mean, std = extractor.chip_statistics(lucas_chips.ChipReader(paths), len(paths), 4)
    np.testing.assert_allclose(mean, pixels.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=1), rtol=1e-5)


def test_tokens_have_the_layer_shape_and_csv_order(extracted, chips, tiny_checkpoint):
    run_dir, _ = extracted
    tokens, pooled = np.load(run_dir / "tokens.npy"), np.load(run_dir / "mean.npy")
    assert tokens.shape == (10, 4, 192) and tokens.dtype == np.float32 and pooled.shape == (10, 192)
    np.testing.assert_allclose(pooled, tokens.mean(axis=1), atol=1e-6)
    record = json.loads((run_dir / "extraction.json").read_text())
    assert record["shape"] == [10, 4, 192] and record["layer"] == 11 and record["bands"]["B4"] == "RED"
    assert not (run_dir / "progress.json").exists() and no_temporary_files(run_dir)
    assert not list(run_dir.glob("*.partial.npy"))
    # Row i is CSV row i's chip through the PyTorch reference of terratorch's encoder at v1 tiny size.
    import rasterio

    config = extractor.VARIANTS["tiny"]
    _, scale, mean, std = extractor.band_preprocessing("correct", "pretraining")
    model = reference.TorchTerraMindS2L2A(192, config.depth, config.num_heads, True, False, image_size=224)
    model.load_state_dict(
        {name: torch.from_numpy(v) for name, v in extractor.read_checkpoint(tiny_checkpoint).items()}
    )
    reference.select_bands(model.eval(), reference.LUCAS_BANDS)
    rows = [line.split(",") for line in (chips / "chips_LC_class.csv").read_text().splitlines()[1:]]
    stack = [
        rasterio.open(chips / label / f"{point_id}.tif").read().transpose(1, 2, 0) for point_id, label in rows
    ]
    inputs = extractor.standardise(np.stack(stack), scale, mean, std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.ascontiguousarray(inputs)))[-1].numpy()
    np.testing.assert_allclose(tokens, expected, atol=1e-4)


def test_interrupted_extraction_resumes_to_the_same_tokens(
    chips, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    # Layer 1 (two blocks): the same streaming and resume code at a fraction of the build time.
    argv = f"--data_root {chips} --checkpoint {tiny_checkpoint} --variant tiny --layer 1 --save_mean"
    argv += " --batch_size 4"
    whole_dir = call_main(extractor, f"{argv} --results_dir {tmp_path / 'whole'}")
    argv += f" --results_dir {tmp_path}"
    calls, real_embed = [], extractor.embed_batch

    def interrupted(*arguments):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_embed(*arguments)

    monkeypatch.setattr(extractor, "SAVE_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(extractor, "embed_batch", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        call_main(extractor, argv)
    assert exit_info.value.code == 130
    monkeypatch.setattr(extractor, "embed_batch", real_embed)
    run_dir = tmp_path / STEM / whole_dir.name
    assert json.loads((run_dir / "progress.json").read_text())["rows"] == 4
    capsys.readouterr()
    assert_main_error(capsys, lambda: call_main(extractor, argv), "interrupted run", "--resume")
    assert_main_error(capsys, lambda: call_main(extractor, argv + " --resume --layer 0"), "layer=1 (now 0)")
    call_main(extractor, argv + " --resume")
    assert "resuming after 4 chips" in capsys.readouterr().out
    for name in ("tokens.npy", "mean.npy"):
        np.testing.assert_array_equal(np.load(run_dir / name), np.load(whole_dir / name))
    # A finished extraction is not redone or overwritten without --overwrite.
    assert_main_error(capsys, lambda: call_main(extractor, argv), "a finished run", "--overwrite")


def test_wrong_variant_or_damaged_checkpoint_is_one_line(chips, tiny_checkpoint, tmp_path, capsys):
    argv = f"--data_root {chips} --results_dir {tmp_path}"
    line = assert_main_error(capsys, lambda: call_main(extractor, f"{argv} --checkpoint {tiny_checkpoint}"))
    assert "does not hold the TerraMind v1 base encoder" in line and "use --variant tiny" in line
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    argv += " --variant tiny --checkpoint"
    assert_main_error(
        capsys, lambda: call_main(extractor, f"{argv} {damaged}"), "cannot be read as safetensors"
    )
    damaged_pt = tmp_path / "damaged.pt"
    damaged_pt.write_bytes(b"not a zip archive" * 10)
    assert_main_error(
        capsys, lambda: call_main(extractor, f"{argv} {damaged_pt}"), "cannot be read by torch.load"
    )


def test_state_dict_check_names_missing_unexpected_and_ignores_the_decoder(tiny_checkpoint, tmp_path):
    state = extractor.read_checkpoint(tiny_checkpoint)
    as_pt = tmp_path / "TerraMind_v1_tiny.pt"
    torch.save({name: torch.from_numpy(value) for name, value in state.items()}, as_pt)
    from_pt = extractor.read_checkpoint(as_pt)
    assert from_pt.keys() == state.keys() and all(np.array_equal(from_pt[k], state[k]) for k in state)
    # The official files hold the whole encoder-decoder: names outside the encoder are not used.
    whole = state | {
        "decoder.0.mlp.fc1.weight": np.zeros((4, 4)),
        "encoder_embeddings.untok_dem@224.proj.weight": 0,
    }
    assert extractor.check_state_dict(whole, "tiny", "ckpt").keys() == state.keys()
    # Buffers may be absent: the sin-cos position embedding and the zero norm biases are recomputed.
    no_buffers = {name: value for name, value in state.items() if not extractor.is_buffer(name)}
    assert len(extractor.check_state_dict(no_buffers, "tiny", "ckpt")) == len(state) - 26
    missing = {name: value for name, value in state.items() if name != "encoder.3.attn.qkv.bias"}
    with pytest.raises(InputError, match=r"1 missing \(encoder\.3\.attn\.qkv\.bias\)"):
        extractor.check_state_dict(missing, "tiny", "ckpt")
    deeper = state | {"encoder.12.norm1.weight": np.ones(192, np.float32)}
    with pytest.raises(InputError, match=r"1 unexpected \(encoder\.12\.norm1\.weight\)"):
        extractor.check_state_dict(deeper, "tiny", "ckpt")
    with pytest.raises(InputError, match="holds no TerraMind encoder tensors"):
        extractor.check_state_dict({"model.weight": np.zeros(3)}, "tiny", "ckpt")


def test_demo_extracts_then_starts_the_probe_grid_on_the_tokens(tmp_path, monkeypatch):
    # The probe's training is train_lucas_classifier.py's (its own tests); here: what it is given.
    import train_lucas_classifier

    probes = []
    monkeypatch.setattr(train_lucas_classifier, "main", probes.append)
    call_main(extractor, f"--demo --demo_scale 0.01 --demo_epochs 2 --layer 1 --results_dir {tmp_path}")
    run_dir = tmp_path / STEM / "terramind_v1_tiny_correct_pretraining"
    assert {path.name for path in run_dir.iterdir()} == {"tokens.npy", "mean.npy", "extraction.json"}
    (probe,) = probes
    assert probe.grid and probe.epochs == 2 and Path(probe.embeddings) == run_dir / "tokens.npy"
    count = len(lucas_chips.read_labels(probe.labels_csv)[0])
    tokens = train_lucas_classifier.read_embeddings(probe.embeddings, probe.labels_csv, count)
    assert tokens.shape == (count, 4, 192)


# ---- --shard K/N and --merge: one extraction split over processes ----


def test_three_shards_and_merge_equal_one_run(chips, tiny_checkpoint, tmp_path, capsys):
    # 10 chips in 4 batches of 3: shard 1 takes batches 1 and 4 (chips 0-2 and 9).
    argv = f"--data_root {chips} --checkpoint {tiny_checkpoint} --variant tiny --layer 0 --save_mean"
    argv += f" --batch_size 3 --results_dir {tmp_path}"
    whole_dir = call_main(extractor, f"{argv} --run_name whole")
    for index in (1, 3):
        call_main(extractor, f"{argv} --run_name sharded --shard {index}/3")
    assert np.load(tmp_path / STEM / "sharded.shards" / "1_of_3" / "tokens.npy").shape == (4, 4, 192)
    capsys.readouterr()
    merge = lambda: call_main(extractor, f"{argv} --run_name sharded --merge")  # noqa: E731
    assert_main_error(
        capsys, merge, "2_of_3: is missing or unfinished", "all 3 shards finished before --merge"
    )
    assert not (tmp_path / STEM / "sharded").exists()
    call_main(extractor, f"{argv} --run_name sharded --shard 2/3")
    call_main(extractor, f"{argv} --run_name sharded --shard 2/3 --resume")
    assert "finished earlier with the same settings" in capsys.readouterr().out
    run_dir = merge()
    assert run_dir == tmp_path / STEM / "sharded"
    for name in ("tokens.npy", "mean.npy"):
        assert (run_dir / name).read_bytes() == (whole_dir / name).read_bytes()
    records = [json.loads((folder / "extraction.json").read_text()) for folder in (whole_dir, run_dir)]
    assert records[1]["settings"] == records[0]["settings"] and records[1]["shards"] == 3
    assert {path.name for path in run_dir.iterdir()} == {"tokens.npy", "mean.npy", "extraction.json"}


@pytest.mark.parametrize("value", ["0/3", "4/3", "x"])
def test_bad_shard_values_are_one_line(chips, tiny_checkpoint, tmp_path, capsys, value):
    argv = f"--data_root {chips} --checkpoint {tiny_checkpoint} --variant tiny --results_dir {tmp_path}"
    call = lambda: call_main(extractor, f"{argv} --shard {value}")  # noqa: E731
    assert_main_error(capsys, call, f"--shard: got '{value}'", "K/N with 1 <= K <= N")
    assert not list(tmp_path.iterdir())
