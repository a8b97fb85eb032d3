"""Where images come from, as the submit stage names it: the readers live in the core
(:mod:`imat.data.sources`), since distillation's extra images read the same folders, manifests and files."""

from imat.data.sources import FRAME_COLUMNS, IMAGE_SUFFIXES, read_images, sample_rows, scan_folder

__all__ = ["FRAME_COLUMNS", "IMAGE_SUFFIXES", "read_images", "sample_rows", "scan_folder"]
