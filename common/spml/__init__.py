"""What the AdaGC / SPML scripts share, and readers of AID-multilabel and BigEarthNet v2.

single_positives  one observed positive per image (random, dominant by area) and the check of a saved set
batches           (images, row index) tf.data batches: reads in row order, per-epoch shuffle, augmentation
evaluation        full-label mAP / micro AP / F1, compiled predictions, re-evaluation of a finished run
aid_multilabel    AID-multilabel reader: JPEG tree + label CSVs, single positives, validation split, demo data
bigearthnet       BigEarthNet v2 reader: LMDBs of band dicts, metadata.parquet, reference maps, positives
band_records      safetensors band records -> reflectance, one record or a batch at memory speed (tf.data)

The SPML losses, label-state updates and AdaGC itself live in train_multilabel_model.py.
"""
