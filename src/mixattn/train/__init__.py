"""Training: the one loop (loop.train), its safety net (safety), corpora and batches (data), and side-by-side runs (compare)."""
