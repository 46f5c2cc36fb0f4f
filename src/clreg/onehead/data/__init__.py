"""Loaders for the challenge's on-disk formats, with augmentation that keeps masks and boxes aligned.

One module per format: :mod:`~clreg.onehead.data.voc` (segmentation), :mod:`~clreg.onehead.data.coco`
(detection), :mod:`~clreg.onehead.data.folders` (classification), over the shared
:mod:`~clreg.onehead.data.common`. Accepted layouts (``{split}`` is ``train``, ``val`` or ``test``):

* segmentation (VOC: JPEG images, palette PNG masks, 255 = ignore)
    1. ``{split}/<id>.jpg`` beside ``{split}/<id>.png``
    2. ``{split}/JPEGImages/`` and ``{split}/SegmentationClass/``
    3. a VOC root: ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/{split}.txt``
* detection (COCO instances JSON, read through pycocotools; categories chosen by name)
    1. ``annotations/instances_{split}2017.json`` with images in ``{split}/`` or ``{split}2017/``
    2. ``{split}/labels.json`` with images in ``{split}/data/``
* classification: class folders ``{split}/<class>/<image>``

Every image is read as RGB. Nothing is written under a data root.

Example:
    >>> import tempfile
    >>> from clreg.onehead.synthetic import SyntheticConfig, generate
    >>> from clreg.onehead.data import SegmentationData
    >>> root = generate(SyntheticConfig(train=2, val=1, test=1, size=64), cache_dir=tempfile.mkdtemp())
    >>> ds = SegmentationData(root / "mini_voc_seg", "train", size=64)
    >>> image, mask = ds[0]
    >>> image.shape, mask.shape, mask.dtype
    (torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.int64)
"""

from .coco import COCO_DEFAULT_CATEGORIES, DetectionData, choose_categories
from .common import Crop, DataFormatError, ImageData, LoadSummary, check_split_overlap, normalize
from .folders import ClassificationData
from .voc import VOC_CLASSES, SegmentationData

__all__ = [
    "COCO_DEFAULT_CATEGORIES",
    "VOC_CLASSES",
    "ClassificationData",
    "Crop",
    "DataFormatError",
    "DetectionData",
    "ImageData",
    "LoadSummary",
    "SegmentationData",
    "check_split_overlap",
    "choose_categories",
    "normalize",
]
