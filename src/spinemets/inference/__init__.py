"""Inference: prediction with the trained models, postprocessing and the reports it writes."""
