"""BigEarthNet v2 as released: ConfigILM resampling, batch decoding, split LMDBs, reference maps, order."""

import numpy as np
import pytest
from conftest import assert_main_error, call_main

import make_benv2_lmdb as mk
from common import pipelines
from common.errors import InputError
from common.spml import band_records, bigearthnet

BANDS = ["B04", "B03", "B02", "B08", "B05", "B11", "B01"]


@pytest.mark.parametrize(("source", "target"), [(20, 120), (60, 120), (120, 224), (60, 224), (120, 100)])
def test_nearest_resampling_equals_configilm_torch_interpolate(source, target):
    import torch
    import torch.nn.functional as F

    band = np.random.default_rng(source).integers(0, 10000, (source, source)).astype(np.uint16)
    reference = F.interpolate(torch.Tensor(np.float32(band))[None, None], (target, target), mode="nearest")
    np.testing.assert_array_equal(band_records.resample_nearest(band, target), reference[0, 0].numpy())


def test_batch_decoder_equals_the_per_record_decoder_on_mixed_layouts():
    from safetensors.numpy import save as save_safetensors

    rng = np.random.default_rng(0)

    def record(dtype=np.uint16, reverse=False):
        sizes = {"B04": 120, "B03": 120, "B02": 120, "B08": 120, "B05": 60, "B11": 60, "B01": 20}
        names = sorted(sizes, reverse=reverse)
        return save_safetensors({b: rng.integers(0, 10000, (sizes[b],) * 2).astype(dtype) for b in names})

    # 20 alike records (two blocks), then other layouts between them: another header, another dtype.
    values = [record() for _ in range(20)]
    values[3], values[17] = record(reverse=True), record(np.float32)
    values[9] = memoryview(values[9])  # LMDB zero-copy buffers decode like bytes
    for size in (120, 100, 24):
        batch = band_records.decode_records(values, BANDS, size)
        assert batch.dtype == np.float32 and batch.ctypes.data % 64 == 0  # handed to TensorFlow uncopied
        np.testing.assert_array_equal(
            batch, np.stack([band_records.decode_value(bytes(v), BANDS, size) for v in values])
        )
    # A truncated record is named by its row, whether its header parses or not.
    for broken in (values[5][:-10], b"\x00garbage"):
        with pytest.raises(band_records.RecordError) as caught:
            band_records.decode_records([*values[:5], broken], BANDS, 120)
        assert caught.value.row == 5


def test_output_buffers_are_reused_only_when_tensorflow_has_let_go():
    import tensorflow as tf

    buffers, shape = band_records.OutputBuffers(spare=0), (2, 4, 4, 3)

    def fill(value):
        out = buffers.take(shape)
        out[...] = value
        return out

    # As in the tf.data reader: a pooled array returned by tf.numpy_function inside a graph.
    batch = tf.function(lambda value: tf.numpy_function(fill, [value], tf.float32, stateful=False))
    first = batch(tf.constant(1.0, tf.float32))
    buffers.arrays[0][0][0, 0, 0, 0] = 7.0  # TensorFlow shares the array: no copy was made
    assert float(first[0, 0, 0, 0]) == 7.0
    second = batch(tf.constant(2.0, tf.float32))  # the first is still held: a second array
    assert len(buffers.arrays) == 2 and float(tf.reduce_sum(first)) == 96.0 + 6.0
    del first
    third = batch(tf.constant(3.0, tf.float32))  # the first array is free again and reused
    assert len(buffers.arrays) == 2 and float(tf.reduce_sum(second)) == 192.0
    view = buffers.arrays[0][0][1]  # any view of a pooled array keeps it taken
    del third
    fourth = batch(tf.constant(4.0, tf.float32))
    assert len(buffers.arrays) == 3 and view.sum() == 144.0 and float(tf.reduce_sum(second)) == 192.0
    del second, view, fourth
    batch(tf.constant(5.0, tf.float32))
    assert len(buffers.arrays) == 1  # no spare kept: the free arrays were released


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    results = tmp_path_factory.mktemp("benv2") / "results"
    return call_main(mk, ["--demo", "--results_dir", str(results)]), results


def test_geotiff_conversion_is_read_per_split_like_one_lmdb(converted):
    output, results = converted
    data = bigearthnet.load(output, "dominant", seed=0, image_size=120, bands=",".join(BANDS))
    assert isinstance(data["lmdb_path"], list) and len(data["lmdb_path"]) == 3
    assert len(data["train"]["sources"]) == 12 and len(data["test"]["sources"]) == 4
    # Values round-trip from the GeoTIFFs unchanged (the 10 m band) and decode like the reference decoder.
    name = data["test"]["sources"][0]
    tiff = results / "demo_data" / "make_benv2_lmdb" / "BigEarthNet-S2" / "S2A_MSIL2A_DEMO_T33UUP" / name
    stored = mk.read_band(tiff / f"{name}_B04.tif")
    images = bigearthnet.read_patches(data["lmdb_path"], data["test"]["sources"], BANDS, 120)
    np.testing.assert_array_equal(images[0, ..., 0], stored.astype(np.float32) * np.float32(1e-4))
    value = bigearthnet.read_values(data["lmdb_path"], [name])[0]
    np.testing.assert_array_equal(images[0], band_records.decode_value(value, BANDS, 120))
    # The tf.data reader gives the same floats.
    reader = bigearthnet.batch_reader(data["lmdb_path"], BANDS, 120, pipelines.ReaderErrors().wrap)
    np.testing.assert_array_equal(reader(np.array(data["test"]["sources"])).numpy(), images)


def test_dominant_single_positive_is_the_largest_reference_map_class(converted):
    output, _ = converted
    data = bigearthnet.load(output, "dominant", seed=0, image_size=120)
    fractions = bigearthnet.reference_map_fractions(data["lmdb_path"], data["train"]["sources"])
    masked = np.where(data["train"]["full"] > 0, fractions, -1)
    assert (data["train"]["observed"].argmax(1) == masked.argmax(1)).all()
    assert (data["train"]["observed"].sum(1) == 1).all()
    # Hand-made map: 3/4 Coniferous forest (312), 1/4 Sea and ocean (523), no class for 999.
    codes = np.full((4, 4), 312, np.uint16)
    codes[0], codes[1, 0] = 523, 999
    classes = bigearthnet.clc_class_lookup()[codes.ravel()]
    counts = np.bincount(classes[classes >= 0], minlength=19)
    assert counts[bigearthnet.CLASSES.index("Coniferous forest")] == 11
    assert counts[bigearthnet.CLASSES.index("Marine waters")] == 4


def test_labels_in_configilm_alphabetical_order_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    full = (rng.random((40, 19)) < 0.3).astype(np.uint8)
    full[np.arange(40), rng.integers(0, 19, 40)] = 1
    ours = np.zeros_like(full)
    ours[np.arange(40), full.argmax(1)] = 1
    to_configilm = [bigearthnet.CLASSES.index(name) for name in bigearthnet.CONFIGILM_CLASS_ORDER]
    path = tmp_path / "train_random_single_labels.npy"
    np.save(path, ours[:, to_configilm])
    with pytest.raises(InputError, match="ConfigILM's alphabetical class order"):
        bigearthnet.read_single_positives(path, full)
    np.save(path, ours)
    assert (bigearthnet.read_single_positives(path, full) == ours).all()


def test_missing_band_file_is_one_line(tmp_path, capsys):
    tiffs = mk.write_demo_tiffs(tmp_path / "tiffs", 2, seed=0)
    next((tiffs / "BigEarthNet-S2").rglob("*_B05.tif")).unlink()
    argv = ["--s2_dir", str(tiffs / "BigEarthNet-S2"), "--out", str(tmp_path / "out")]
    assert_main_error(capsys, lambda: call_main(mk, argv), "_B05.tif: band file missing")
    assert not (tmp_path / "out").exists()
