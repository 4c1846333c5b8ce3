"""Evaluation: the metrics, lesion detection (FROC) and the external check."""
