"""Every speed bench runs at a tiny size and prints its table and ratio line (bench.measure).

The benches run in this process (TensorFlow loads once), one thread count each; what is checked is
that they run and that their output parses, not their timings.
"""

import pytest

from bench import measure
from tests.conftest import call_main

# (bench module, tiny arguments): each runs in a few seconds on 2 cores.
TINY = {
    "peer_speed": "--threads 1 --rounds 1 --spml_steps 1 --spml_batch 2 --image_size 64 --lucas_chips 16 "
    "--lucas_dim 16",
    "spade_gan_speed": "--threads 1 --rounds 1 --sizes demo --demo_batch 1",
    "segmentation_speed": "--threads 1 --rounds 1 --image_size 64 --images 2 --batch_size 1 --steps 1 "
    "--metric_batches 1",
    "terramind_extraction_speed": "--threads 1 --rounds 1 --variant tiny --image_size 32 --batch_size 1",
    "multilabel_input_speed": "--threads 1 --rounds 1 --aid_images 4 --ben_patches 8 --batch_size 4",
    "pass_end_idle": "--epochs 1 --steps 1 --step_seconds 0.01",
    "bench_lucas_frozen_features": "--threads 1 --rounds 1 --epochs 1 --backbone simplecnn --demo_scale 0.02",
    "tgmatl_exp1_speed": "--short_epochs 1 --long_epochs 2 --baseline_epochs 2 --baseline_heads_per_method 1 "
    "--workers 1",
    "tgmatl_exp2_speed": "--baseline_epochs 3 --chunk_epochs 1 --workers 1",
    "owl_gps_speed": "--rounds 1 --pool_size 64 --baseline_pool_size 32 --mc_passes 2",
    "dataset_creator_speed": "--size 512 --repeats 1 --compress none",
}

# Benches that print their model's FLOPs and the fraction of a matmul's speed they reach.
FLOP_BENCHES = {"peer_speed", "spade_gan_speed", "segmentation_speed", "terramind_extraction_speed"}


def ratio_lines(output):
    return [line for line in output.splitlines() if line.startswith(measure.RATIO_PREFIX)]


@pytest.mark.parametrize("name", sorted(TINY))
def test_bench_runs_and_prints_ratios(name, capsys, tmp_path, monkeypatch):
    argv = TINY[name]
    if name == "multilabel_input_speed":
        argv += f" --workdir {tmp_path}"
    if name == "dataset_creator_speed":
        argv += f" --tmp_dir {tmp_path}"
    monkeypatch.setattr("sys.argv", [name, *argv.split()])
    call_main(f"bench.{name}", argv)
    output = capsys.readouterr().out
    last = output.strip().splitlines()[-1]
    assert ratio_lines(output) == [last], output[-3000:]
    parsed = measure.parse_ratio_line(last)
    assert parsed and all(ratio > 0 and kind in ("wall", "cpu") for *_, ratio, kind in parsed)
    assert "| task | contender | threads |" in output  # the table with its load columns
    if name in FLOP_BENCHES:
        assert "GFLOP/s per core-second" in output and "float32 2048 x 2048 matmul" in output


def test_gpu_speed_tiny_on_cpu(capsys):
    # Every workload but SegFormer-B7, whose step is SegFormer-B0's with a larger encoder (building the
    # B7 encoder alone takes minutes on a CPU), in float32. Mixed precision on the CPU runs
    # mixed_float16; it runs here for the two custom training steps that scale the loss themselves (SPML,
    # SPADE GAN). The others leave mixed precision to Keras's compiled step (the scripts' tests run it)
    # or to inference (the caption batch in torch bfloat16, not run here).
    workloads = [name for name in __import__("bench.gpu_speed").gpu_speed.WORKLOADS if name != "segformer_b7"]
    rows = call_main(
        "bench.gpu_speed",
        f"--tiny --steps 1 --warmup 1 --precisions float32 --workloads {','.join(workloads)}",
    )
    assert "| workload | precision |" in capsys.readouterr().out
    rows += call_main(
        "bench.gpu_speed", "--tiny --steps 1 --warmup 1 --precisions mixed --workloads spml,spade_gan"
    )
    assert sorted((row[0], row[1]) for row in rows) == sorted(
        [(name, "float32") for name in workloads] + [("spml", "mixed"), ("spade_gan", "mixed")]
    )


def test_ratio_line_round_trip():
    sample = [measure.Sample(1.0, 1.0, 0.5, 0.0)]
    loaded = [measure.Sample(2.0, 1.0, 99.0, 0.0)]
    rows = [
        measure.Row("train", "ours", 1, 10, "images", sample),
        measure.Row("train", "torch", 1, 10, "images", [measure.Sample(2.0, 3.0, 0.5, 0.0)]),
        measure.Row("eval", "ours", 2, 10, "images", loaded),
        measure.Row("eval", "torch", 2, 20, "images", [measure.Sample(2.0, 4.0, 0.5, 0.0)]),
    ]
    parsed = measure.parse_ratio_line(measure.ratio_line(rows))
    # Unloaded: wall ratio; loaded (either row): CPU ratio, per item.
    assert parsed == [("train", "torch", 1, 2.0, "wall"), ("eval", "torch", 2, 2.0, "cpu")]


def test_tgmatl_exp1_bench_counts_the_long_run_whole_when_the_difference_is_noise(monkeypatch, capsys):
    from bench import tgmatl_exp1_speed as bench

    # The long run took less CPU than the short one: the steady cost cannot be separated.
    samples = iter([measure.Sample(2.0, 3.0, 0.5, 0.0), measure.Sample(2.5, 2.0, 0.5, 0.0)])
    monkeypatch.setattr(bench, "our_seconds", lambda *args: next(samples))
    monkeypatch.setattr(
        bench, "baseline_seconds_per_head_epoch", lambda *args: [measure.Sample(0.1, 0.1, 0.5, 0.0)]
    )
    args = bench.get_args_parser().parse_args("--short_epochs 1 --long_epochs 2".split())
    ours, _ = bench.measure_rows(args, 1)
    assert "counted whole" in capsys.readouterr().out
    assert ours.samples[0].cpu == 2.0 and ours.items == bench.FULL_HEADS * 2
