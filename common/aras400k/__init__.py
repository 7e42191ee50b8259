"""ARAS400k (Caglar & Temizel, arXiv 2603.09625): what its scripts share, and readers of its data.

classes       the 7 classes, the WorldCover code remap, the mask palette, colour <-> label
worldcover    the WorldCover 2021 release: S2 scenes paired with map tiles, labels on a scene's pixel grid
patches       the segmentation layout {train,val,test}/{images,masks}/*.png: listing, mask checks, tf.data
percentages   class-percentage tables of mask folders, the captioners' input
efficientnet  the EfficientNet encoder of the SegFormer and its 5-stage feature pyramid
demo_data     seeded demo inputs: S2 + WorldCover GeoTIFF tiles, segmentation patches
captions      the captioners' shared parts: percentage CSVs, image lists, resumable caption CSVs, generation
"""
