"""LUCAS land-cover chips shared by train_lucas_classifier.py and extract_terramind_embeddings.py.

lucas_chips   the study's chip folder: labels CSV, chip paths and headers, tf.data chip reader, names
demo_chips    seeded synthetic LUCAS-like chips and labels CSV in the study's class proportions
"""
