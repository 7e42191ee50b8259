"""Shared code of the rsrepro scripts: generic modules, each with one purpose, and one package a paper.

Generic infrastructure every script may use:
errors            InputError, require*, cli_entry: a user mistake ends in one line and exit 2
atomic            every write through a temporary file and a rename (text, JSON, CSV, npy/npz, Keras, figures)
runs              seeding, run folders, config.json and the one "same settings" check on resume
cli               parser that knows typed flags, YAML overlay, demo defaults, shared flag groups
checkpoints       resumable state: arrays keyed by variable path, state.json written last, keep the last N
pipelines         tf.data helpers: (seed, epoch) orders, reader errors as InputErrors, band statistics
plots             Agg backend, atomic save, confusion matrices, curves, grouped bars
reports           mean +- std over folds or seeds, CSV and markdown tables
parallel          one spawn-process job runner behind every --workers; the --shard K/N layout and --merge
startup           imported before TensorFlow: keeps its C++ start-up lines out of the output
raster            GeoTIFF reading and writing in windows (rasterio)
metrics           streaming confusion matrix and the metrics derived from it
fused_bn          TensorFlow's fused batch-norm kernel behind Keras BatchNormalization layers (same variables)
distribute        --strategy multiworker: MultiWorkerMirroredStrategy (TF_CONFIG or SLURM) for Keras 3 fit
optimizers        Adam/AdamW as Keras optimizers that step as torch.optim's; --optimizer_convention
tensorboard       a run's log rows as TensorBoard scalars under <run>/tensorboard/, written by TensorFlow
precision         --mixed_precision: float16 on a GPU, bfloat16 on a bf16 CPU, float32 logits and losses
progress          tqdm bars with rate and ETA on stderr, on a terminal or with --progress
demos             python -m common.demos: every script's demo, one line each, a table of summary lines
copy_script       python -m common.copy_script: scripts and exactly the modules they import, into a project

One package a paper: what two or more of its scripts share, and readers of its public data sets.
The paper's own losses, scores, selection and update rules live in the script that trains it.
tgmatl/           TG-MATL: the AWIR data protocol and the stacked training engine of the igarss scripts
owl_gps/          OWL-GPS readers: 4-band patches (images.npy, tiled GeoTIFF), concepts and labels
spml/             AdaGC / SPML: single positives, batches, evaluation; AID-multilabel, BigEarthNet v2 readers
aras400k/         ARAS400k: classes, palette, patch readers, the SegFormer encoder, captions
lucas/            TerraMind-on-LUCAS: the chip folder reader and the demo chips
"""
