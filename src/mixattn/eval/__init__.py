"""Evaluation and reporting."""
