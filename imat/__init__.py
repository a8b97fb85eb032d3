"""imat: fine-grained recognition competitions, from raw files to a submission.

This package holds what every stage shares: configs, the CLI, competition formats, the downloader,
manifests, datasets and augmentation, metrics and the training engine.
"""

__version__ = "0.1.0"
