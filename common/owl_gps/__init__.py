"""OWL-GPS data readers: 4-band patches, their concepts and labels, from the tutorial's folder or a GeoTIFF.

patches    images.npy (in memory or streamed batch by batch) and a 4-band GeoTIFF tiled into patches
concepts   concepts CSV, the tutorial's concepts.pkl read without running code, 0/1 labels, grid keys
datasets   the folder or the scene as one dataset dict; the tutorial's synthetic set and its writer
"""
