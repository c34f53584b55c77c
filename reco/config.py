"""Frozen configuration dataclasses for the ReCo core.

Defaults follow ``RECO_SPEC.md`` (the paper's reference values). YAML never reaches this module:
jobs parse YAML at the edge and call :func:`from_dict`, which rejects unknown keys with a clear
message, so a typo in a config file is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, TypeVar

from .errors import ConfigError

T = TypeVar("T")

REFERENCE_CONTEXT_CONCEPTS: Tuple[str, ...] = ("tree", "sky", "building", "road", "person")


@dataclass(frozen=True)
class CRFConfig:
    """DenseCRF settings (reference values of the ReCo code)."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    # Unary = -log softmax(scale * scores). The reference uses the raw scores (scale 1).
    unary_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"crf.iterations must be >= 1, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb", "unary_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"crf.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class BankConfig:
    """How reference embeddings are built from a concept's archive (spec steps 1-4)."""

    k: int = 50
    image_size: int = 224
    language_guidance: bool = True
    language_temperature: float = 10.0
    context_elimination: bool = True
    context_concepts: Tuple[str, ...] = REFERENCE_CONTEXT_CONCEPTS
    # The paper averages the per-image maxima over all k images including the token's own
    # image. With tiny archives (1-3 exemplars) that term dominates; excluding it is the
    # better estimate of "how well does this token match the *other* images".
    exclude_own_image: bool = False
    # Rows of the k*hw x k*hw affinity computed at once; memory is O(block_size * k * hw).
    block_size: int = 256
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"bank.k must be >= 1, got {self.k}")
        if self.image_size < 14:
            raise ConfigError(f"bank.image_size must be >= 14, got {self.image_size}")
        if self.block_size < 1:
            raise ConfigError(f"bank.block_size must be >= 1, got {self.block_size}")
        if self.batch_size < 1:
            raise ConfigError(f"bank.batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.context_concepts, tuple):
            object.__setattr__(self, "context_concepts", tuple(self.context_concepts))


@dataclass(frozen=True)
class SegmenterConfig:
    """Dense inference settings (spec steps 5-6)."""

    image_size: int = 320
    dense_clip: bool = True
    text_temperature: float = 10.0
    # Optional per-concept calibration: standardise cos(f, ref_c) with the statistics stored
    # in the bank before the sigmoid, so concepts whose references match everything do not
    # win the argmax. Off by default (the paper has no calibration).
    calibrate: bool = False
    # If set, a constant "background" class with this score is put first in the label space,
    # so pixels whose best concept score is below it become background (and CRF sees it too).
    background_threshold: Optional[float] = None
    crf: Optional[CRFConfig] = None
    # Images per encoder forward pass (images with the same inference size are batched).
    batch_size: int = 4
    # A bank is refused on encoders other than the ones it was built with (name and weights);
    # experts who know two checkpoints are interchangeable may allow it (logged as a warning).
    allow_encoder_mismatch: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 14:
            raise ConfigError(f"segmenter.image_size must be >= 14, got {self.image_size}")
        if self.batch_size < 1:
            raise ConfigError(f"segmenter.batch_size must be >= 1, got {self.batch_size}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, Tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Optional[Mapping[str, Any]], where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a plain mapping, strictly.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key path.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive, fields are checked above
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-ready) representation of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


__all__ = [
    "BankConfig",
    "CRFConfig",
    "SegmenterConfig",
    "REFERENCE_CONTEXT_CONCEPTS",
    "from_dict",
    "to_dict",
]
