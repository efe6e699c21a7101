"""Training: the one loop (loop.train) and its safety net (safety); corpora and batches live in ``mixattn.data``."""
