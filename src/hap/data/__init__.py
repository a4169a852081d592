"""Datasets shipped offline or in standard on-disk formats (filled in by the data work)."""
