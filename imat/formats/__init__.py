"""Competition-format readers: every supported input (docs/ARCHITECTURE.md, File formats) becomes manifest rows.

Formats (``data.format``; ``auto`` detects them): ``furniture2018``, ``fashion2018``, ``product2019``
(:mod:`imat.formats.imaterialist`), ``coco`` (:mod:`imat.formats.coco`), ``imagenet``
(:mod:`imat.formats.imagenet`), ``imagefolder`` and ``csv`` (:mod:`imat.formats.tables`).
:mod:`imat.formats.build` turns the config's ``data`` section into the manifest and class map.

What the config's ``data`` keys mean per format:

=============  ==========================================  ==============================================
format         ``data.train`` / ``val`` / ``test``         ``data.images``
=============  ==========================================  ==============================================
furniture2018  train.json / validation.json / test.json    where ``<image_id>.jpg`` are (download target)
fashion2018    same (test only: multi-label not trained)   where ``<imageId>.jpg`` are
product2019    train.json / val.json / test.json           where ``<id>`` (``*.jpg``) are
coco           the COCO JSON of each split                 root that ``file_name`` is relative to
imagenet       ``train/`` (wnid folders); val: flat folder  optional; folders inside it are stored
               (labels found beside it), wnid folders, or   relative to it, others absolute; the label
               LOC_val_solution.csv / ground-truth txt       files' images are relative to it
imagefolder    ``root/<class>/<image>``; test may be flat  optional, as for imagenet folders
csv            CSV with ``path,label[,image_id,url]``      root of ``path`` (default: the CSV's folder)
=============  ==========================================  ==============================================
"""

from imat.formats.build import build_manifest, read_source, read_split, resolve_path, write_manifest
from imat.formats.common import FORMATS, SplitData
from imat.formats.detect import detect_format

__all__ = [
    "FORMATS",
    "SplitData",
    "build_manifest",
    "detect_format",
    "read_source",
    "read_split",
    "resolve_path",
    "write_manifest",
]
