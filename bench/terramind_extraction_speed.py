"""TerraMind v1 encoder speed: the Keras port (ours) vs the PyTorch reference, chips/s on this machine.

Both run the same randomly initialised encoder of `--variant` (real shapes, 12 layers for base) on
the same standardised 6-band `--image_size` chips: ours is the Keras encoder of
extract_terramind_embeddings.py as that script runs it (`predict_on_batch`), the baseline the
PyTorch transcription of terratorch's TerraMindViT in tests/fixtures/make_terramind_fixture.py
(`torch.no_grad`), both on the same thread count. Measured by `bench.measure` (alternating rounds,
wall and CPU time, load; 1 thread and all cores); the encoder's FLOPs per chip are printed next to a
float32 matmul's GFLOP/s. The last line is the ratio ours / baseline (> 1: ours is faster).

    python -m bench.terramind_extraction_speed --variant base --batch_size 8 --rounds 3
    python -m bench.terramind_extraction_speed --variant tiny --image_size 32 --batch_size 1 --threads 1
"""

import argparse

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import torch

import extract_terramind_embeddings as extractor
from bench import measure
from common import runs
from common.lucas import lucas_chips
from tests.fixtures import make_terramind_fixture as reference


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="base", choices=list(extractor.VARIANTS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    measure.add_arguments(parser, rounds=3)
    return parser


def measure_rows(options, threads):
    runs.seed_everything(0)
    config = extractor.VARIANTS[options.variant]
    torch_model = reference.TorchTerraMindS2L2A(
        config.dim, config.depth, config.num_heads, config.bias, config.gated_mlp, image_size=224
    )
    torch_model = reference.randomise(torch_model, seed=0).eval()
    state = {name: value.detach().numpy() for name, value in torch_model.state_dict().items()}
    reference.select_bands(torch_model, reference.LUCAS_BANDS)
    bands = len(lucas_chips.BAND_NAMES)
    keras_model = extractor.build_encoder(config, options.image_size, bands, config.depth - 1)
    extractor.assign_weights(keras_model, state, reference.LUCAS_BANDS, options.image_size)
    size, batch = options.image_size, options.batch_size
    shape = (batch, size, size, bands)
    chips = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    torch_chips = torch.from_numpy(np.ascontiguousarray(chips.transpose(0, 3, 1, 2)))

    def ours():
        return np.asarray(keras_model.predict_on_batch(chips))

    def baseline():
        with torch.no_grad():
            return torch_model(torch_chips)[-1].numpy()

    difference = float(np.abs(ours() - baseline()).max())
    print(f"TerraMind v1 {options.variant}, {batch} chips of {size} px; max difference {difference:.1e}")
    samples = measure.alternate({"ours": ours, "baseline": baseline}, options.rounds)
    task = f"TerraMind {options.variant} extraction"
    rows = measure.rows_for(task, samples, batch, threads, "chips")
    flops = measure.model_flops(keras_model, shape[1:], False)
    measure.print_fraction_of_peak(rows, {task: flops})
    return rows


def main(options):
    return measure.run(options, measure_rows, "bench.terramind_extraction_speed")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
