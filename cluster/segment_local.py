"""``reco segment``: a few images segmented in this process (no Ray) with a bank or a trained model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from reco.errors import ImageDecodeError

logger = logging.getLogger(__name__)


def _bank_runner(
    bank_uri: str, vocab: Optional[List[str]], cfg, overrides: Dict[str, Any], storage: Mapping[str, Any]
) -> Tuple[Callable, str]:
    from index.storage import load_bank

    from .drivers import check_segmenter
    from .models import encoders_for_bank

    bank = load_bank(bank_uri, storage)
    if vocab:
        bank = bank.subset(vocab)
    seg = check_segmenter(bank, encoders_for_bank(bank, **overrides), cfg)

    def run(img):
        res = seg(img)[0]
        return res.labels.numpy(), res.class_names

    return run, seg.mode


def _model_runner(model_uri: str, storage: Mapping[str, Any]) -> Tuple[Callable, str]:
    from index.outputs import load_segmodel

    model = load_segmodel(model_uri, storage)

    def run(img):
        labels, names = model.predict(img)
        return np.asarray(labels), tuple(names)

    return run, f"ReCo+ model {model_uri}"


def segment_images(
    images: List[str],
    out: Optional[str],
    storage: Mapping[str, Any],
    *,
    model: Optional[str] = None,
    bank: Optional[str] = None,
    vocab: Optional[List[str]] = None,
    cfg=None,
    overrides: Optional[Dict[str, Any]] = None,
) -> int:
    """Segment ``images`` with ``model`` (a ReCo+ model URI) or ``bank`` (+ segmenter config and
    encoder overrides); write ``<name>.labels.png``, ``<name>.overlay.png`` and ``legend.png`` into
    ``out`` (default: beside each image), print each image's class shares. Returns the number of
    images that could not be read."""
    import sys

    from index.labels import encode_labels
    from index.outputs import check_output_folder
    from index.readers import read_image
    from reco.visualize import legend, overlay, side_by_side

    missing = [i for i in images if not Path(i).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    if out:
        check_output_folder(out)
    if model:
        run, mode = _model_runner(model, storage)
    else:
        assert bank, "segment needs a model or a bank"
        run, mode = _bank_runner(bank, vocab, cfg, overrides or {}, storage)
    failures = 0
    legends = set()
    for path in images:
        src = Path(path)
        out_dir = Path(out) if out else src.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            img = read_image(str(src))
        except (ImageDecodeError, OSError) as exc:
            logger.error("%s: %s", src, exc)
            failures += 1
            continue
        lab, class_names = run(img)
        (out_dir / f"{src.name}.labels.png").write_bytes(encode_labels(lab))
        side_by_side(img, overlay(img, lab)).save(out_dir / f"{src.name}.overlay.png")
        if out_dir not in legends:
            legend(class_names).save(out_dir / "legend.png")
            legends.add(out_dir)
        ids, counts = np.unique(lab, return_counts=True)
        shares = ", ".join(
            f"{class_names[i]} {100 * c / lab.size:.1f}%" for i, c in sorted(zip(ids, counts), key=lambda t: -t[1])
        )
        sys.stdout.write(f"{src}: {shares}  -> {out_dir / (src.name + '.labels.png')}\n")
    logger.info("mode: %s; legend: %s", mode, ", ".join(str(d / "legend.png") for d in sorted(legends)))
    return failures
