"""Face photos: decoding (images, qc), detection (detect), ArcFace alignment (align, pipeline).

Kept free of imports so that worker processes load only what they use (images.py imports torch).
See docs/alignment.md.
"""
