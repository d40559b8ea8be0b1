"""File outputs: atomic HDF5 writing."""
