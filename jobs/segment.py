"""``reco segment IMAGE... --bank BANK`` (ReCo) or ``--model MODEL`` (a ReCo+ model from
``reco train``): segment a few images in this process (no Ray).

For people trying a bank or a model out: writes ``<name>.labels.png`` (class ids), ``<name>.overlay.png``
(image | colour labels) and one ``legend.png`` (class colours and names) next to each input, or
into ``--out``. Prints each image's classes with their pixel shares. Exit status 2 when an image
could not be read (the others are still written).
"""

from __future__ import annotations

from typing import List, Optional

from .common import (
    JobParser,
    add_encoder_args,
    add_storage_args,
    encoder_overrides,
    parse_storage_options,
    parse_vocab,
    segmenter_config,
)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco segment", __doc__)
    p.add_argument("images", nargs="+", help="image files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bank", help="concept bank URI (ReCo)")
    src.add_argument(
        "--model", help="trained ReCo+ model URI (reco train's RUN folder, RUN/model, or its .safetensors)"
    )
    p.add_argument("--out", help="output folder (default: next to each input)")
    add_storage_args(p)
    add_encoder_args(p)
    args = p.parse_args(argv)

    from cluster.segment_local import segment_images

    bank_args = (
        {}
        if args.model
        else dict(vocab=parse_vocab(args.vocab), cfg=segmenter_config(args), overrides=encoder_overrides(args))
    )
    failures = segment_images(
        args.images,
        args.out,
        parse_storage_options(args.storage_options),
        model=args.model,
        bank=args.bank,
        **bank_args,
    )
    return 2 if failures else 0
