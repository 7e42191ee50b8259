"""Shared code of the rsrepro scripts: small modules, each with one purpose.

errors            InputError, require*, cli_entry: a user mistake ends in one line and exit 2
atomic            every write through a temporary file and a rename (text, JSON, CSV, npy/npz, Keras, figures)
runs              seeding, run folders, config.json and the one "same settings" check on resume
cli               parser that knows typed flags, YAML overlay, demo defaults, shared flag groups
checkpoints       resumable state: arrays keyed by variable path, state.json written last, keep the last N
pipelines         tf.data helpers: (seed, epoch) orders, reader errors as InputErrors, band statistics
plots             Agg backend, atomic save, confusion matrices, curves, grouped bars
reports           mean +- std over folds or seeds, CSV and markdown tables
parallel          one spawn-process job runner behind every --workers
startup           imported before TensorFlow: keeps its C++ start-up lines out of the output
raster            GeoTIFF reading and writing in windows (rasterio)
metrics           streaming confusion matrix and the metrics derived from it
awir              TG-MATL data protocol: labels, box features, clusters, the one fold split
triplet           triplet losses (batch-all, batch-hard, MATL) and the TG-MATL selection rule
stacked_training  many small models trained side by side in one compiled graph (TG-MATL heads)
"""
