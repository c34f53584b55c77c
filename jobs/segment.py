"""``reco segment IMAGE... --bank BANK`` (ReCo) or ``--model MODEL`` (a ReCo+ model from
``reco train``): segment a few images in this process (no Ray).

For people trying a bank or a model out: writes ``<name>.labels.png`` (class ids), ``<name>.overlay.png``
(image | colour labels) and one ``legend.png`` (class colours and names) next to each input, or
into ``--out``. Prints each image's classes with their pixel shares.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from reco.errors import ImageDecodeError

from .pseudo_label import add_encoder_args, parse_json_object, parse_vocab, segmenter_config

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco segment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bank", help="concept bank URI (ReCo)")
    src.add_argument("--model", help="trained ReCo+ model URI (reco train's RUN folder, RUN/model, or its .safetensors)")
    p.add_argument("--out", help="output folder (default: next to each input)")
    p.add_argument("--vocab", help="only these concepts of the bank: a,b,c or a file with one name per line")
    p.add_argument("--storage-options", default="{}", help="JSON fsspec options for an s3:// bank")
    add_encoder_args(p)
    args = p.parse_args(argv)

    import numpy as np

    from cluster.models import encoders_for_bank
    from index.labels import encode_labels
    from index.readers import read_image
    from index.storage import load_bank
    from reco.segmenter import Segmenter
    from reco.visualize import legend, overlay, side_by_side

    storage = parse_json_object(args.storage_options, "--storage-options")
    missing = [i for i in args.images if not Path(i).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    if args.model:
        from .train import load_segmodel

        model = load_segmodel(args.model, storage)

        def run(img):
            labels, names = model.predict(img)
            return np.asarray(labels), tuple(names)

        mode = f"ReCo+ model {args.model}"
    else:
        cfg = segmenter_config(args)
        bank = load_bank(args.bank, storage)
        vocab = parse_vocab(args.vocab)
        if vocab:
            bank = bank.subset(vocab)
        spec = encoders_for_bank(bank, args.dense_weights, args.clip_model, args.clip_weights, args.clip_dense_head,
                                 parse_json_object(args.dense_kwargs, "--dense-kwargs"))
        dense, clip, _ = spec.load()
        seg = Segmenter(bank, dense, clip, cfg)

        def run(img):
            res = seg(img)[0]
            return res.labels.numpy(), res.class_names

        mode = seg.mode
    failures = 0
    legends = set()
    for path in args.images:
        src = Path(path)
        out_dir = Path(args.out) if args.out else src.parent
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
        shares = ", ".join(f"{class_names[i]} {100 * c / lab.size:.1f}%"
                           for i, c in sorted(zip(ids, counts), key=lambda t: -t[1]))
        sys.stdout.write(f"{src}: {shares}  -> {out_dir / (src.name + '.labels.png')}\n")
    logger.info("mode: %s; legend: %s", mode, ", ".join(str(d / "legend.png") for d in sorted(legends)))
    return 2 if failures else 0
