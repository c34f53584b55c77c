"""``reco submit | status | logs | stop | list``: run jobs on a Ray cluster through Ray's Jobs API.

    reco submit [--address URL] [--no-wait] [--entrypoint-num-cpus N] [--entrypoint-num-gpus N]
                [--env KEY=VALUE ...] JOB [JOB ARGS ...]
    reco status [ID]           reco logs ID [--follow]           reco stop ID           reco list

The address is the cluster's job API, ``http://HEAD:8265`` (``--address``, else
``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``). The token comes from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. Without a cluster, run ``reco JOB ...`` directly:
it starts an embedded local Ray.

Exit status: 0 done (or submitted with --no-wait), 2 a usage / connection / auth error, else the
failed job's own exit status (3: rerun to retry transient failures; 1 when unknown or stopped).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from cluster.submit import JobClient, SubmitError, cluster_summary, exit_code, finish, parse_env, status_line

from .common import JobParser, nonneg_float, nonneg_int, positive_float

logger = logging.getLogger(__name__)

#: the cluster commands themselves are not jobs
CLUSTER_COMMANDS = ("submit", "status", "logs", "stop", "list")


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)",
    )


def _jobs() -> List[str]:
    from jobs.cli import COMMANDS

    return sorted(c for c in COMMANDS if c not in CLUSTER_COMMANDS)


def submit_main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco submit", "Submit a reco job to a Ray cluster (Ray Jobs API).")
    _address_arg(p)
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--entrypoint-num-cpus", type=nonneg_float, default=None, help="CPUs reserved for the job's driver")
    p.add_argument("--entrypoint-num-gpus", type=nonneg_float, default=None, help="GPUs reserved for the job's driver")
    p.add_argument("--entrypoint-memory", type=nonneg_int, default=None, help="memory (bytes) reserved for the driver")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable; credentials are refused)",
    )
    p.add_argument("--working-dir", default=None, help="code uploaded with the job (default: this checkout)")
    p.add_argument("--submission-id", default=None, help="choose the submission id (default: Ray makes one)")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    p.add_argument("job", help="the job to run: " + ", ".join(_jobs()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    a = p.parse_args(argv)
    if a.job not in _jobs():
        raise SubmitError(f"unknown job {a.job!r}: one of {', '.join(_jobs())}")
    env = parse_env(a.env)
    client = JobClient(a.address)
    sub_id = client.submit(
        a.job,
        list(a.args),
        working_dir=a.working_dir,
        env=env,
        entrypoint_num_cpus=a.entrypoint_num_cpus,
        entrypoint_num_gpus=a.entrypoint_num_gpus,
        entrypoint_memory=a.entrypoint_memory,
        submission_id=a.submission_id,
        python=a.python,
    )
    print(sub_id, flush=True)
    if a.no_wait:
        logger.info(
            "submitted %s to %s: `reco status %s`, `reco logs %s --follow`, `reco stop %s`",
            sub_id,
            client.address,
            sub_id,
            sub_id,
            sub_id,
        )
        return 0
    try:
        client.follow(sub_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running: `reco logs {sub_id} --follow`, `reco stop {sub_id}`",
            file=sys.stderr,
        )
        return 130
    return finish(client, client.wait(sub_id, timeout=60))


def status_main(argv: Optional[List[str]] = None) -> int:
    p = JobParser(
        "reco status",
        description="A job's status (with its last log lines when it failed), or the cluster's job summary without ID.",
    )
    _address_arg(p)
    p.add_argument("id", nargs="?", help="submission id")
    a = p.parse_args(argv)
    client = JobClient(a.address)
    if a.id:
        return finish(client, client.info(a.id))
    print(cluster_summary(client))
    return 0


def logs_main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco logs", description="A job's logs.")
    _address_arg(p)
    p.add_argument("id", help="submission id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.add_argument("--tail", type=nonneg_int, default=None, metavar="N", help="only the last N lines")
    a = p.parse_args(argv)
    client = JobClient(a.address)
    if a.follow:
        try:
            client.follow(a.id)
        except KeyboardInterrupt:
            return 130
        info = client.wait(a.id, timeout=60)
        return exit_code(info)
    text = client.logs(a.id)
    if a.tail is not None:
        text = "\n".join(text.splitlines()[-a.tail :]) + "\n" if a.tail > 0 else ""
    sys.stdout.write(text)
    return 0


def stop_main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco stop", description="Stop a running job.")
    _address_arg(p)
    p.add_argument("id", help="submission id")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for it to stop")
    a = p.parse_args(argv)
    client = JobClient(a.address)
    if not client.stop(a.id):
        info = client.info(a.id)
        print(f"{a.id} had already ended: {status_line(info)}")
        return 0
    info = client.wait(a.id, timeout=a.timeout)
    print(status_line(info))
    return 0


def list_main(argv: Optional[List[str]] = None) -> int:
    p = JobParser("reco list", description="Jobs on the cluster, oldest first.")
    _address_arg(p)
    a = p.parse_args(argv)
    client = JobClient(a.address)
    jobs = [j for j in client.list() if getattr(j, "submission_id", None)]
    if not jobs:
        print(f"no submitted jobs on {client.address}")
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        print(status_line(j))
    return 0


main = submit_main
