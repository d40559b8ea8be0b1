"""Whole-slide image access: readers, resolution planning, tissue detection, tiling and QC images."""
