"""Test-only fault hooks (cluster/faults.py), loaded in a job's processes and its Ray workers by
``RECO_FAULT_HOOKS=<this file>``: each point holds the work for the seconds of its variable, so a
test can kill a job, an actor or a node in the middle of it. Never imported by production code."""

import os
import time

from cluster import faults

#: fault point -> the variable holding its delay in seconds (unset or 0: no delay)
DELAYS = {
    "bank.concept": "RECO_TEST_BANK_DELAY_S",
    "embed.batch": "RECO_TEST_EMBED_DELAY_S",
    "segment.batch": "RECO_TEST_SEGMENT_DELAY_S",
    "index.part": "RECO_TEST_INDEX_PART_DELAY_S",
    "exact.block": "RECO_TEST_EXACT_DELAY_S",
}


def _delay(variable):
    def hold(*_args):
        seconds = float(os.environ.get(variable, "0") or 0)
        if seconds:
            time.sleep(seconds)

    return hold


for _point, _variable in DELAYS.items():
    faults.register(_point, _delay(_variable))
