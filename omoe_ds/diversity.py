"""Kept for the documented `omoe_ds.diversity.diverse_degree`; the code is in omoe_ds/studies/diversity.py."""
from omoe_ds.studies.diversity import diverse_degree

__all__ = ["diverse_degree"]
