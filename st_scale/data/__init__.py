"""Datasets: the bundled digits set (the embedded default) and, for training, FFCV files."""
