"""Evaluation protocols over in-memory labels: archives made from labelled frames, folds by drive.

Pure functions (numpy / torch, no paths, no Ray): ``index/`` reads the datasets, ``cluster/`` and
``jobs/`` run them. Only the *selection* of archive images uses labels; what goes into a bank is
always the images (or image windows) alone, never their masks.

* :func:`best_windows` / :func:`crop_archives`: the concept-centric "crops" archive of issue 15:
  per class and per frame, the ``size`` x ``size`` window (stride ``stride``) with the largest
  share of the class; the ``k`` frames with the largest share, their windows as the archive.
* :func:`frame_archives`: whole frames where the class covers at least ``min_coverage``, largest
  share first, up to ``k``.
* :func:`drive_of` / :func:`drive_folds`: leave-one-drive-out folds (CamVid ids are
  ``<drive>_<frame>``), the only folds whose scored frames are not near-duplicates of an archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

ARCHIVE_MODES = ("crops", "frames")


@dataclass(frozen=True)
class ArchiveEntry:
    """One archive member: frame ``index`` (into the list given), the window ``box`` =
    (left, top, right, bottom) in pixels (the whole frame in ``frames`` mode) and the class's
    share of that window."""

    index: int
    box: Tuple[int, int, int, int]
    share: float


def coverage(masks: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(n, C) share of each image's pixels (all pixels, ignore included) held by each class."""
    out = np.zeros((len(masks), num_classes))
    for i, m in enumerate(masks):
        counts = np.bincount(m[(m >= 0) & (m < num_classes)].reshape(-1), minlength=num_classes)
        out[i] = counts / max(m.size, 1)
    return out


def window_positions(length: int, size: int, stride: int) -> List[int]:
    """Start offsets of ``size``-long windows every ``stride`` along ``length`` (one window at 0
    when the side is shorter than the window: it is then clipped to the side)."""
    if length <= size:
        return [0]
    return list(range(0, length - size + 1, stride))


def best_windows(
    mask: np.ndarray, num_classes: int, size: int = 180, stride: int = 30
) -> Tuple[np.ndarray, np.ndarray]:
    """Per class, the window with the largest share of the class in one (H, W) mask.

    Windows are ``size`` x ``size`` (clipped to a smaller image) at offsets every ``stride`` px in
    row-major order; the share is the class's pixel count over the window's pixel count (void
    pixels count in the denominator). Ties go to the first window in row-major order.
    Returns ((C, 4) boxes (left, top, right, bottom), (C,) shares)."""
    h, w = mask.shape
    ys, xs = window_positions(h, size, stride), window_positions(w, size, stride)
    wh, ww = min(size, h), min(size, w)
    boxes = np.zeros((num_classes, 4), dtype=np.int64)
    shares = np.zeros(num_classes)
    for c in range(num_classes):
        integ = np.zeros((h + 1, w + 1), dtype=np.int64)
        integ[1:, 1:] = np.cumsum(np.cumsum(mask == c, axis=0), axis=1)
        best, box = -1.0, (0, 0, ww, wh)
        for y in ys:
            for x in xs:
                n = integ[y + wh, x + ww] - integ[y, x + ww] - integ[y + wh, x] + integ[y, x]
                share = n / float(wh * ww)
                if share > best:
                    best, box = share, (x, y, x + ww, y + wh)
        boxes[c], shares[c] = box, best
    return boxes, shares


def crop_archives(
    ids: Sequence[str],
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
    k: int = 50,
    size: int = 180,
    stride: int = 30,
) -> Dict[str, List[ArchiveEntry]]:
    """The concept-centric crop archives: per class, every frame's best window
    (:func:`best_windows`); the ``k`` frames whose window has the largest share (ties by id),
    frames without the class left out. Classes absent from every frame get no archive."""
    n = len(classes)
    per_frame = [best_windows(m, n, size, stride) for m in masks]
    out: Dict[str, List[ArchiveEntry]] = {}
    for c, name in enumerate(classes):
        cand = [i for i in range(len(ids)) if per_frame[i][1][c] > 0]
        cand.sort(key=lambda i: (-per_frame[i][1][c], ids[i]))
        if cand:
            out[name] = [ArchiveEntry(i, _box(per_frame[i][0][c]), float(per_frame[i][1][c])) for i in cand[:k]]
    return out


def _box(row: np.ndarray) -> Tuple[int, int, int, int]:
    """A (4,) row of :func:`best_windows`' boxes as (left, top, right, bottom) ints."""
    left, top, right, bottom = (int(v) for v in row)
    return left, top, right, bottom


def frame_archives(
    ids: Sequence[str], masks: Sequence[np.ndarray], classes: Sequence[str], k: int = 50, min_coverage: float = 0.01
) -> Dict[str, List[ArchiveEntry]]:
    """Per class: the frames where it covers at least ``min_coverage`` of the pixels, largest
    share first (ties by id), up to ``k``; the whole frame is the archive member."""
    cover = coverage(masks, len(classes))
    out: Dict[str, List[ArchiveEntry]] = {}
    for c, name in enumerate(classes):
        cand = [i for i in range(len(ids)) if cover[i, c] >= min_coverage]
        cand.sort(key=lambda i: (-cover[i, c], ids[i]))
        if cand:
            out[name] = [
                ArchiveEntry(i, (0, 0, int(masks[i].shape[1]), int(masks[i].shape[0])), float(cover[i, c]))
                for i in cand[:k]
            ]
    return out


def make_archives(
    mode: str,
    ids: Sequence[str],
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
    k: int = 50,
    min_coverage: float = 0.01,
    size: int = 180,
    stride: int = 30,
) -> Dict[str, List[ArchiveEntry]]:
    """:func:`crop_archives` or :func:`frame_archives` by ``mode`` (one of :data:`ARCHIVE_MODES`)."""
    if mode == "crops":
        return crop_archives(ids, masks, classes, k, size, stride)
    if mode == "frames":
        return frame_archives(ids, masks, classes, k, min_coverage)
    raise ValueError(f"unknown archive mode {mode!r}; valid: {', '.join(ARCHIVE_MODES)}")


def mean_shares(archives: Mapping[str, Sequence[ArchiveEntry]]) -> Dict[str, float]:
    """Mean share of each class in its own archive (how much of the archive is about it)."""
    return {n: float(np.mean([e.share for e in a])) for n, a in archives.items()}


def drive_of(image_id: str) -> Optional[str]:
    """The drive (sequence) of a CamVid-style id ``[folder/]<drive>_<frame>[.ext]``; None when the
    name has no ``_``."""
    name = image_id.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit("_", 1)[0] if "_" in name else None


def drive_folds(ids: Sequence[str]) -> List[Tuple[str, List[int], List[int]]]:
    """Leave-one-drive-out folds: [(held-out drive, archive indices, scored indices)], drives in
    sorted order. Needs at least two drives and a drive for every id."""
    drives = sorted({str(drive_of(i)) for i in ids})
    if len(drives) < 2 or any(drive_of(i) is None for i in ids):
        raise ValueError(f"leave-one-drive-out needs at least 2 drives, got {drives}")
    return [
        (
            d,
            [i for i, x in enumerate(ids) if str(drive_of(x)) != d],
            [i for i, x in enumerate(ids) if str(drive_of(x)) == d],
        )
        for d in drives
    ]


def archives_from_labels(
    ids: Sequence[str], cover: np.ndarray, classes: Sequence[str], k: int, min_coverage: float = 0.01
) -> Dict[str, List[int]]:
    """Per class: indices of the images where it covers at least ``min_coverage`` of the pixels,
    largest coverage first (ties by id: deterministic, as a retrieval ranking would be), up to
    ``k``. Classes with no such image get no archive (they are not built, never predicted)."""
    out = {}
    for c, name in enumerate(classes):
        cand = [i for i in range(len(ids)) if cover[i, c] >= min_coverage]
        cand.sort(key=lambda i: (-cover[i, c], ids[i]))
        if cand:
            out[name] = cand[:k]
    return out


@torch.no_grad()
def supervised_references(
    feats: Sequence[torch.Tensor], masks: Sequence[np.ndarray], num_classes: int, purity: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The supervised-prototype ceiling's references: per class, the normalised mean of the
    L2-normalised feature tokens whose cell is at least ``purity`` that class in the ground
    truth (masks area-averaged onto each image's token grid).

    Returns ((C, D) references, (C,) bool: class seen, (2,) (mean, std) of the best-reference
    cosine over all tokens, for calibration)."""
    d = feats[0].shape[1]
    sums = torch.zeros(num_classes, d)
    seen = torch.zeros(num_classes, dtype=torch.bool)
    all_tokens = []
    for f, m in zip(feats, masks):
        f = F.normalize(f.float(), dim=1)[0]  # (D, h, w)
        h, w = f.shape[-2:]
        mt = torch.from_numpy(np.asarray(m)).long()
        valid = (mt >= 0) & (mt < num_classes)
        onehot = F.one_hot(torch.where(valid, mt, torch.full_like(mt, num_classes)), num_classes + 1)
        frac = F.adaptive_avg_pool2d(onehot.permute(2, 0, 1)[None].float(), (h, w))[0, :num_classes]
        best, lab = frac.max(dim=0)
        pure = best >= purity
        tokens = f.permute(1, 2, 0).reshape(-1, d)
        all_tokens.append(tokens)
        lab, pure = lab.reshape(-1), pure.reshape(-1)
        sums.index_add_(0, lab[pure], tokens[pure])
        seen[lab[pure]] = True
    refs = F.normalize(sums, dim=1)
    toks = torch.cat(all_tokens)
    sim = (toks @ refs[seen].T).max(dim=1).values if seen.any() else torch.zeros(1)
    return refs, seen, torch.stack([sim.mean(), sim.std()])


def class_prior_map(masks: Sequence[np.ndarray], num_classes: int, grid: int = 64) -> np.ndarray:
    """(grid, grid) most frequent class per relative image position over ``masks`` (each mask
    resized to the grid with nearest neighbours; ignore pixels do not vote)."""
    from PIL import Image

    counts = np.zeros((num_classes, grid, grid), dtype=np.int64)
    for m in masks:
        small = np.asarray(Image.fromarray(m.astype(np.int32), mode="I").resize((grid, grid), Image.Resampling.NEAREST))
        for c in range(num_classes):
            counts[c] += small == c
    return counts.argmax(axis=0)


def prior_prediction(prior: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(
        Image.fromarray(prior.astype(np.int32), mode="I").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    ).astype(np.int64)


def has_drives(ids: Sequence[str]) -> bool:
    """Whether leave-one-drive-out folds exist: every id names a drive and there are >= 2."""
    drives = {drive_of(i) for i in ids}
    return None not in drives and len(drives) >= 2
