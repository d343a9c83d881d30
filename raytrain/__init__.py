"""raytrain: train language models end to end on Ray."""

__version__ = "0.1.0"
