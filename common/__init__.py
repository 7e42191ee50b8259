"""Shared code of the rsrepro scripts: small modules, each with one purpose.

Mechanisms every script uses:
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
fused_bn          TensorFlow's fused batch-norm kernel behind Keras BatchNormalization layers (same variables)
distribute        --strategy multiworker: MultiWorkerMirroredStrategy (TF_CONFIG or SLURM) for Keras 3 fit
optimizers        Adam/AdamW as Keras optimizers that step as torch.optim's; --optimizer_convention

TG-MATL:
awir              TG-MATL data protocol: labels, box features, clusters, the one fold split, shared flags
npy               .npy/.npz headers read without loading; rows streamed in batches; row-chunk checkpoints
triplet           triplet losses (batch-all, batch-hard, MATL) and the TG-MATL selection rule
stacked_training  many small models trained side by side in one compiled graph; per-method timing calibration
embedding_views   t-SNE / UMAP maps and class / box-cluster silhouette scores of projections

AdaGC / SPML:
spml              SPML baselines: losses, label state, single positives, mAP/F1, row-index batches, trainer
spml_evaluation   SPML re-evaluation of a finished run (--test_only, test_multilabel_model.py, tuning)
aid_multilabel    AID-multilabel reader: JPEG tree + label CSVs, single positives, validation split, demo data
bigearthnet       BigEarthNet v2 reader: LMDBs of band dicts, metadata.parquet, reference maps, positives
band_records      safetensors band records -> reflectance, one record or a batch at memory speed (tf.data)

OWL-GPS, ARAS400k, LUCAS:
owl_gps_data      OWL-GPS inputs and run state: patch readers, concepts (CSV, plain pickle), labels, results
aras400k          ARAS400k classes, WorldCover remap, palette, colour <-> label, map mosaic, patch readers
captions          ARAS400k captions: percentage CSVs, reference prompts, resumable caption CSVs, VL inputs
lucas             LUCAS chips: labels CSV, chip reader, stratified split, metrics and tables, 6-band backbones
terramind         TerraMind v1 S2L2A encoder in Keras, loaded strictly from terratorch-named checkpoints
aras400k_build    ARAS400k build records: tile journals, tile/patch splits, shards and merge, manifest, report
terrascope_local  a local Terrascope catalogue on 127.0.0.1 (search, token, downloads) for demo and tests
"""
