"""Tests for extract_embeddings.py on tiny randomly initialised CLIP / DINOv2 / ViT-MAE checkpoints.

The demo builds the checkpoints (saved like the hub's: full CLIPModel, Dinov2Model,
ViTMAEForPreTraining, each with its image processor) and a 240-image data.npz; the other tests
reuse those folders on small generated data.npz files. No network: the hub is switched off.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_embeddings as ee

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "extract_embeddings.py"
WIDTHS = {"clip": 512, "dinov2": 768, "mae": 768}


def offline_env(hf_home):
    """Environment for a subprocess with no hub access and an empty Hugging Face cache."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "CUDA_VISIBLE_DEVICES": "",
    }


def run_script(*arguments, hf_home, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=offline_env(hf_home),
        timeout=300,
    )


def run_main(*arguments):
    """main() in this process (no interpreter start-up): the same code path as the command line."""
    ee.main(ee.get_args_parser().parse_args([str(argument) for argument in arguments]))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def small_images(num_samples=7, size=40, seed=1):
    """Structured small images: a random background and one bright rectangle per image."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 120, size=(num_samples, size, size, 3), dtype=np.uint8)
    for index in range(num_samples):
        corner = rng.integers(0, size // 2, size=2)
        rows, columns = slice(corner[0], corner[0] + size // 3), slice(corner[1], corner[1] + size // 4)
        rgb[index, rows, columns] = rng.integers(150, 256, 3)
    return rgb


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One --demo run (240 images at 300x300, the three tiny models at the real output widths)."""
    results_dir = tmp_path_factory.mktemp("demo_results")
    result = run_script("--demo", "--results_dir", results_dir, hf_home=results_dir / "hf_home")
    return result, results_dir / "demo_data" / "extract_embeddings"


@pytest.fixture(scope="module")
def models(demo):
    result, demo_dir = demo
    assert result.returncode == 0, result.stderr[-2000:]
    return {name: demo_dir / name for name in WIDTHS}


@pytest.fixture
def small_data(tmp_path):
    rgb = small_images()
    return write_npz(
        tmp_path / "data.npz",
        class_label=np.arange(len(rgb)) % 3,
        rgb=rgb,
        box_label=np.tile([0, 10, 0, 10], (len(rgb), 1)),
    )


def test_help():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for flag in (
        "--data",
        "--model",
        "--model_path",
        "--embeddings_dir",
        "--input",
        "--batch_size",
        "--device",
        "--demo",
    ):
        assert flag in result.stdout


def test_demo_writes_every_documented_file(demo):
    result, demo_dir = demo
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(demo_dir / "data.npz") as data:
        assert data["rgb"].shape == (240, 300, 300, 3) and data["rgb"].dtype == np.uint8
        assert data["thermal"].shape == (240, 300, 300, 1)
        assert data["box_label"].shape == (240, 4) and set(np.unique(data["class_label"])) == {0, 1, 2}
    for name, width in WIDTHS.items():
        for file in ("config.json", "model.safetensors", "preprocessor_config.json"):
            assert (demo_dir / name / file).is_file()
        embeddings = np.load(demo_dir / "embeddings" / f"awir_{name}_emb.npy")
        assert embeddings.shape == (240, width) and embeddings.dtype == np.float32
        assert np.isfinite(embeddings).all()
        record = json.loads((demo_dir / "embeddings" / f"awir_{name}_emb.json").read_text())
        assert record["derived"]["shape"] == [240, width] and record["derived"]["model"] == name
    assert sorted(path.name for path in (demo_dir / "embeddings").iterdir()) == sorted(
        f"awir_{name}_emb.{suffix}" for name in WIDTHS for suffix in ("npy", "json")
    )
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith("demo: clip (240, 512), dinov2 (240, 768), mae (240, 768) -> ")
    )


def test_embedding_rows_follow_the_images(demo, models):
    """Row i must be image i: the demo's classes differ in object colour and shape, so leave-one-out
    1-nearest-neighbour on the embeddings recovers the class far above chance (1/3) only if the rows
    stay aligned with class_label."""
    _, demo_dir = demo
    with np.load(demo_dir / "data.npz") as data:
        class_label = data["class_label"]
    for name in WIDTHS:
        embeddings = np.load(demo_dir / "embeddings" / f"awir_{name}_emb.npy").astype(np.float64)
        standardised = (embeddings - embeddings.mean(0)) / (embeddings.std(0) + 1e-8)
        distances = ((standardised[:, None] - standardised[None]) ** 2).sum(-1)
        np.fill_diagonal(distances, np.inf)
        accuracy = (class_label[distances.argmin(1)] == class_label).mean()
        assert accuracy > 0.8, (name, accuracy)
        # A shuffled pairing of rows and labels is at chance: the check above is about alignment.
        shuffled = np.random.default_rng(0).permutation(class_label)
        assert (shuffled[distances.argmin(1)] == shuffled).mean() < 0.6


def test_igarss_exp1_accepts_the_files(demo, models, tmp_path):
    """The TG-MATL experiment reads all three files (one loss, two epochs, no maps: the files matter)."""
    _, demo_dir = demo
    result = subprocess.run(
        [
            sys.executable,
            "igarss_exp1.py",
            "--data",
            str(demo_dir / "data.npz"),
            "--embeddings_dir",
            str(demo_dir / "embeddings"),
            "--embeddings",
            "clip",
            "dinov2",
            "mae",
            "--methods",
            "dtl",
            "--epochs",
            "2",
            "--calibration_epochs",
            "1",
            "--views",
            "--workers",
            "1",
            "--results_dir",
            str(tmp_path / "results"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=offline_env(tmp_path / "hf_home"),
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_runs_give_identical_arrays(models, small_data, tmp_path):
    """Bit-for-bit re-runs, in this process and in a fresh one (MAE's patch order is fixed, not random)."""
    for name, folder in models.items():
        for run in ("first", "second"):
            run_main(
                "--data",
                small_data,
                "--model",
                name,
                "--model_path",
                folder,
                "--batch_size",
                3,
                "--embeddings_dir",
                tmp_path / run,
            )
        first = np.load(tmp_path / "first" / f"awir_{name}_emb.npy")
        assert first.shape == (7, WIDTHS[name])
        assert np.array_equal(first, np.load(tmp_path / "second" / f"awir_{name}_emb.npy"))
    result = run_script(
        "--data",
        small_data,
        "--model",
        "mae",
        "--model_path",
        models["mae"],
        "--batch_size",
        3,
        "--embeddings_dir",
        tmp_path / "fresh",
        hf_home=tmp_path / "hf_home",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.array_equal(
        np.load(tmp_path / "first" / "awir_mae_emb.npy"), np.load(tmp_path / "fresh" / "awir_mae_emb.npy")
    )


def test_embeddings_equal_the_models_own_outputs(models, small_data, tmp_path):
    """CLIP = get_image_features; DINOv2 = CLS after the last layer norm; MAE = encoder CLS with every
    patch kept (equal for any patch order, and different from the 75%-masked pre-training CLS)."""
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model, ViTMAEModel

    images = list(np.load(small_data)["rgb"])
    for name, folder in models.items():
        run_main(
            "--data",
            small_data,
            "--model",
            name,
            "--model_path",
            folder,
            "--batch_size",
            4,
            "--embeddings_dir",
            tmp_path,
        )
        ours = np.load(tmp_path / f"awir_{name}_emb.npy")
        pixel_values = AutoImageProcessor.from_pretrained(folder, backend="pil")(
            images=images, return_tensors="pt"
        )["pixel_values"]
        with torch.no_grad():
            if name == "clip":
                clip = CLIPModel.from_pretrained(folder).eval()
                reference = clip.get_image_features(pixel_values).pooler_output
            elif name == "dinov2":
                reference = Dinov2Model.from_pretrained(folder).eval()(pixel_values).last_hidden_state[:, 0]
            else:
                unmasked = ViTMAEModel.from_pretrained(folder, mask_ratio=0.0).eval()
                reference = unmasked(pixel_values).last_hidden_state[:, 0]  # random patch order
                masked = ViTMAEModel.from_pretrained(folder).eval()(pixel_values).last_hidden_state[:, 0]
                assert not np.allclose(ours, masked.numpy(), atol=1e-3)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_embeddings(models, small_data, tmp_path):
    for batch_size in (1, 7):
        run_main(
            "--data",
            small_data,
            "--model",
            "dinov2",
            "--model_path",
            models["dinov2"],
            "--batch_size",
            batch_size,
            "--embeddings_dir",
            tmp_path / str(batch_size),
        )
    np.testing.assert_allclose(
        np.load(tmp_path / "1" / "awir_dinov2_emb.npy"),
        np.load(tmp_path / "7" / "awir_dinov2_emb.npy"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_identical_images_give_identical_rows(models, tmp_path):
    rgb = small_images(4)
    rgb[3] = rgb[0]
    data = write_npz(tmp_path / "data.npz", class_label=np.zeros(4, int), rgb=rgb)
    run_main(
        "--data",
        data,
        "--model",
        "clip",
        "--model_path",
        models["clip"],
        "--batch_size",
        3,
        "--embeddings_dir",
        tmp_path,
    )
    embeddings = np.load(tmp_path / "awir_clip_emb.npy")
    np.testing.assert_allclose(embeddings[3], embeddings[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(embeddings[1], embeddings[0], atol=1e-4)


def test_thermal_input_scalings_agree(models, tmp_path):
    """Thermal (N,H,W,1) is replicated to RGB; uint8, float in [0,1] and raw values with --rescale
    minmax all reach the model as the same 8-bit image."""
    thermal = small_images(5)[..., :1]
    thermal[:, 0, 0] = 0
    thermal[:, 0, 1] = 255
    variants = {
        "uint8": thermal,
        "unit_float": thermal.astype(np.float32) / 255,
        "kelvin": 270.0 + thermal.astype(np.float64) * 0.2,
    }
    results = {}
    for variant, values in variants.items():
        data = write_npz(
            tmp_path / f"{variant}.npz",
            class_label=np.zeros(5, int),
            thermal=values,
            rgb=np.repeat(thermal, 3, axis=-1),
        )
        rescale = "minmax" if variant == "kelvin" else "auto"
        run_main(
            "--data",
            data,
            "--model",
            "dinov2",
            "--model_path",
            models["dinov2"],
            "--input",
            "thermal",
            "--rescale",
            rescale,
            "--embeddings_dir",
            tmp_path / variant,
        )
        results[variant] = np.load(tmp_path / variant / "awir_dinov2_emb.npy")
    run_main(
        "--data",
        tmp_path / "uint8.npz",
        "--model",
        "dinov2",
        "--model_path",
        models["dinov2"],
        "--embeddings_dir",
        tmp_path / "as_rgb",
    )
    assert np.array_equal(results["uint8"], results["unit_float"])
    assert np.array_equal(results["uint8"], results["kelvin"])
    assert np.array_equal(results["uint8"], np.load(tmp_path / "as_rgb" / "awir_dinov2_emb.npy"))


def test_streaming_reader_matches_np_load(tmp_path):
    """Batches read straight from the archive equal the stored array (plain, compressed, Fortran order)."""
    images = small_images(5, size=12)
    for writer in (np.savez, np.savez_compressed):
        path = tmp_path / f"{writer.__name__}.npz"
        writer(path, rgb=images, thermal=np.asfortranarray(images[..., :1].astype(np.float32)))
        for key in ("rgb", "thermal"):
            batches = [batch for _, batch in ee.iter_npz_batches(path, key, 2)]
            assert [len(batch) for batch in batches] == [2, 2, 1]
            assert np.array_equal(np.concatenate(batches), np.load(path)[key])


# ---- bad input: one line, exit 2, nothing written ----


def assert_clean_failure(capsys, expected_fragment, embeddings_dir, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected_fragment in lines[0], lines
    assert not Path(embeddings_dir).exists() or not any(Path(embeddings_dir).glob("*emb*"))


def bad_data(tmp_path, case):
    rgb = small_images(4)
    labels = np.arange(4) % 3
    path = tmp_path / "data.npz"
    if case == "missing":
        return tmp_path / "no_such.npz", "file not found"
    if case == "not_npz":
        path.write_text("class_label,rgb\n")
        return path, "not a readable .npz archive"
    if case == "npy_not_npz":
        np.save(tmp_path / "data.npy", rgb)
        return tmp_path / "data.npy", "not a readable .npz archive"
    if case == "no_rgb":
        return write_npz(path, class_label=labels, thermal=rgb[..., :1]), "no 'rgb' array"
    if case == "four_channels":
        return write_npz(path, class_label=labels, rgb=np.concatenate([rgb, rgb[..., :1]], -1)), "has shape"
    if case == "length_mismatch":
        return write_npz(path, class_label=labels[:3], rgb=rgb), "class_label has shape (3,)"
    if case == "nan":
        values = rgb.astype(np.float32)
        values[2, 5, 5, 1] = np.nan
        return write_npz(path, class_label=labels, rgb=values), "sample 2 contains NaN"
    if case == "out_of_range":
        return write_npz(path, class_label=labels, rgb=rgb.astype(np.float32) * 4), "--rescale minmax"
    if case == "objects":
        return write_npz(path, class_label=labels, rgb=np.array([None] * 4, dtype=object)), "Python objects"
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not_npz",
        "npy_not_npz",
        "no_rgb",
        "four_channels",
        "length_mismatch",
        "nan",
        "out_of_range",
        "objects",
    ],
)
def test_bad_data_is_one_clear_line(models, tmp_path, capsys, case):
    data, fragment = bad_data(tmp_path, case)
    out = tmp_path / "embeddings"
    assert_clean_failure(
        capsys,
        fragment,
        out,
        lambda: run_main(
            "--data", data, "--model", "clip", "--model_path", models["clip"], "--embeddings_dir", out
        ),
    )


def test_bad_model_folders_are_one_clear_line(models, small_data, tmp_path, capsys):
    out = tmp_path / "embeddings"
    # A DINOv2 folder given for CLIP would otherwise load as a randomly initialised CLIP.
    assert_clean_failure(
        capsys,
        "holds a 'dinov2' model",
        out,
        lambda: run_main(
            "--data", small_data, "--model", "clip", "--model_path", models["dinov2"], "--embeddings_dir", out
        ),
    )
    assert_clean_failure(
        capsys,
        "no such folder",
        out,
        lambda: run_main(
            "--data",
            small_data,
            "--model",
            "clip",
            "--model_path",
            tmp_path / "clip-vit-base-patch32",
            "--embeddings_dir",
            out,
        ),
    )
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert_clean_failure(
        capsys,
        "no usable config.json",
        out,
        lambda: run_main(
            "--data", small_data, "--model", "clip", "--model_path", empty, "--embeddings_dir", out
        ),
    )
    # A checkpoint missing weights would leave them randomly initialised.
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial_model"
    shutil.copytree(models["dinov2"], partial)
    weights = load_file(partial / "model.safetensors")
    save_file(
        {key: value for key, value in weights.items() if "layernorm" not in key},
        partial / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert_clean_failure(
        capsys,
        "checkpoint lacks",
        out,
        lambda: run_main(
            "--data", small_data, "--model", "dinov2", "--model_path", partial, "--embeddings_dir", out
        ),
    )
    if not torch.cuda.is_available():
        assert_clean_failure(
            capsys,
            "no CUDA",
            out,
            lambda: run_main(
                "--data",
                small_data,
                "--model",
                "clip",
                "--model_path",
                models["clip"],
                "--device",
                "cuda",
                "--embeddings_dir",
                out,
            ),
        )


def test_existing_embeddings_are_kept_without_overwrite(models, small_data, tmp_path, capsys):
    out = tmp_path / "embeddings"
    out.mkdir()
    (out / "awir_clip_emb.npy").write_bytes(b"finished earlier")
    with pytest.raises(SystemExit) as exit_info:
        run_main(
            "--data", small_data, "--model", "clip", "--model_path", models["clip"], "--embeddings_dir", out
        )
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "awir_clip_emb.npy").read_bytes() == b"finished earlier"
    run_main(
        "--data",
        small_data,
        "--model",
        "clip",
        "--model_path",
        models["clip"],
        "--embeddings_dir",
        out,
        "--overwrite",
    )
    assert np.load(out / "awir_clip_emb.npy").shape == (7, 512)


def test_missing_model_without_network_is_one_line(small_data, tmp_path):
    """The default hub id with no network and an empty cache: one line naming the model, exit 2."""
    result = run_script(
        "--data",
        small_data,
        "--model",
        "dinov2",
        "--embeddings_dir",
        tmp_path / "embeddings",
        hf_home=tmp_path / "hf_home",
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: facebook/dinov2-base: ") and result.stderr.count("\n") == 1
    assert "expected a local dinov2 model folder" in result.stderr
    assert not (tmp_path / "embeddings").exists()


def test_interrupted_run_resumes_to_the_same_bits(models, small_data, tmp_path, monkeypatch, capsys):
    arguments = [
        "--data",
        small_data,
        "--model",
        "mae",
        "--model_path",
        models["mae"],
        "--batch_size",
        2,
        "--checkpoint_every",
        3,
    ]
    run_main(*arguments, "--embeddings_dir", tmp_path / "uninterrupted")
    # Stop in the third batch: the checkpoint after two batches (rows 0-3) is on disk.
    real_embed_batch, calls = ee.embed_batch, []

    def interrupted_embed_batch(*batch_arguments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_embed_batch(*batch_arguments)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(ee, "embed_batch", interrupted_embed_batch)
    with pytest.raises(SystemExit) as exit_info:
        run_main(*arguments, "--embeddings_dir", out)
    assert exit_info.value.code == 130 and not (out / "awir_mae_emb.npy").exists()
    assert [path.name for path in sorted((out / ".awir_mae_emb.partial").iterdir())] == [
        "rows_000000000_000000004.npy",
        "run.json",
    ]
    monkeypatch.setattr(ee, "embed_batch", real_embed_batch)
    capsys.readouterr()
    assert_clean_failure(
        capsys,
        "--resume to continue it",
        tmp_path / "nothing",
        lambda: run_main(*arguments, "--embeddings_dir", out),
    )
    assert_clean_failure(
        capsys,
        "partial embeddings were made with batch_size=2 (now 1)",
        tmp_path / "nothing",
        lambda: run_main(
            *arguments, "--embeddings_dir", out, "--resume", "--input", "rgb", "--batch_size", 1
        ),
    )
    run_main(*arguments, "--embeddings_dir", out, "--resume")
    assert "resume: 4 of 7 images" in capsys.readouterr().out
    assert np.array_equal(
        np.load(out / "awir_mae_emb.npy"), np.load(tmp_path / "uninterrupted" / "awir_mae_emb.npy")
    )
    assert sorted(path.name for path in out.iterdir()) == ["awir_mae_emb.json", "awir_mae_emb.npy"]


# ---- --shard K/N and --merge: one extraction split over processes ----


def test_three_shards_and_merge_equal_one_run(models, small_data, tmp_path, capsys):
    arguments = [
        "--data",
        small_data,
        "--model",
        "dinov2",
        "--model_path",
        models["dinov2"],
        "--batch_size",
        2,
    ]
    run_main(*arguments, "--embeddings_dir", tmp_path / "one")
    out = tmp_path / "sharded"
    for index in (1, 3):  # 7 images in 4 batches of 2: shard 1 takes batches 1 and 4
        run_main(*arguments, "--embeddings_dir", out, "--shard", f"{index}/3", "--checkpoint_every", 2)
    assert np.load(out / "awir_dinov2_emb.npy.shards" / "1_of_3.npy").shape == (3, 768)
    capsys.readouterr()
    assert_clean_failure(
        capsys,
        "2_of_3.npy: is missing or unfinished; expected all 3 shards finished before --merge",
        tmp_path / "nothing",
        lambda: run_main(*arguments, "--embeddings_dir", out, "--merge"),
    )
    assert not (out / "awir_dinov2_emb.npy").exists()
    run_main(*arguments, "--embeddings_dir", out, "--shard", "2/3")
    run_main(*arguments, "--embeddings_dir", out, "--shard", "2/3", "--resume")
    assert "is complete; nothing to resume" in capsys.readouterr().out
    run_main(*arguments, "--embeddings_dir", out, "--merge")
    one, merged = (folder / "awir_dinov2_emb.npy" for folder in (tmp_path / "one", out))
    assert merged.read_bytes() == one.read_bytes()
    records = [json.loads(path.with_suffix(".json").read_text())["derived"] for path in (one, merged)]
    assert records[1]["data"] == records[0]["data"] and records[1]["merged_shards"] == 3


@pytest.mark.parametrize(
    "value, fragment",
    [("0/3", "got '0/3'"), ("4/3", "got '4/3'"), ("x", "got 'x'"), ("5/5", "at most 4 shards")],
)
def test_bad_shard_values_are_one_line(models, small_data, tmp_path, capsys, value, fragment):
    arguments = ["--data", small_data, "--model", "clip", "--model_path", models["clip"], "--batch_size", 2]
    call = lambda: run_main(*arguments, "--embeddings_dir", tmp_path / "out", "--shard", value)  # noqa: E731
    assert_clean_failure(capsys, fragment, tmp_path / "out", call)
