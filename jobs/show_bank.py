"""``reco show-bank BANK``: one HTML page to see why each concept of a bank works or fails.

A searchable list of concepts (status, reason, seconds, archive size, mean seed score); per
concept its archive thumbnails as the co-segmentation saw them (centre crops at the bank's image
size) with the seed token marked and, where the bank stored them, the co-segmentation score
heat-map overlaid. Written to ``BANK/report/index.html`` (or ``--out``) with thumbnails beside it.
Also run by ``reco build-bank --report``.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from .common import JobParser, add_storage_args, parse_storage_options, positive_int

logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco show-bank", __doc__)
    p.add_argument("bank", help="bank URI written by reco build-bank")
    p.add_argument("--out", help="output folder (default: BANK/report)")
    p.add_argument("--max-images", type=positive_int, default=12, help="archive thumbnails per concept")
    add_storage_args(p)
    args = p.parse_args(argv)
    from cluster.bank_report import write_report

    page = write_report(args.bank, args.out, args.max_images, parse_storage_options(args.storage_options))
    logger.info("bank browser: %s", page)
    return 0
