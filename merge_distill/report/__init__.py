"""The blending report: run statistics (stats.py) and their presentation."""
