"""Frozen configuration dataclasses for the ReCo core.

The defaults are what leave-one-drive-out cross-validation inside ``camvid-train`` chose on the
fair CamVid crop protocol (``docs/results.md``): the paper's fixed context elimination with a seed
region of 100 tokens per archive image. They need no CLIP and no separate context archives: a
context concept takes its archive from the vocabulary when it is there (or an alias of it, see
:func:`resolve_context`) and is left out, with a warning, when no archive exists. The paper's
reference values of ``RECO_SPEC.md`` are the preset ``preset("reco-paper")``.
YAML never reaches this module: jobs parse YAML at the edge and call :func:`from_dict`, which
rejects unknown keys with a clear message, so a typo in a config file is an error instead of a
silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Tuple, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
logger = logging.getLogger(__name__)

REFERENCE_CONTEXT_CONCEPTS: Tuple[str, ...] = ("tree", "sky", "building", "road", "person")
#: The paper's context concepts under the names some vocabularies use for them (CamVid's person is
#: ``pedestrian``): :func:`resolve_context` takes the first alias that has an archive.
CONTEXT_ALIASES: Mapping[str, Tuple[str, ...]] = {"person": ("pedestrian", "people")}


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


CONTEXT_ORDERS: Tuple[str, ...] = ("given", "archive-size", "confidence", "ownership", "enrichment", "others")
CALIBRATIONS: Tuple[str, ...] = ("none", "archive", "archive-threshold")


@dataclass(frozen=True)
class BankConfig:
    """How reference embeddings are built from a concept's archive (spec steps 1-4).

    The defaults are the configuration leave-one-drive-out CV inside ``camvid-train`` chose on
    the fair CamVid crop protocol (``docs/results.md``; the same as :func:`preset`
    ``("reco-paper-regions")``): the paper's context elimination with context archives taken from
    the vocabulary where it names them, and seed regions of 100 tokens. They need no CLIP. The
    paper's configuration is :func:`preset` ``("reco-paper")``.
    """

    k: int = 50
    image_size: int = 224
    language_guidance: bool = True
    language_temperature: float = 10.0
    # The paper's context elimination: references of ``context_concepts`` are built first from
    # their own archives (each with the earlier ones eliminated) and eliminated from every target.
    # A context concept without an archive of its own takes the vocabulary's archive of the same
    # name (or of an alias, ``CONTEXT_ALIASES``); one with neither is left out with a warning
    # (recorded in the bank's metadata) unless ``context_required``, which makes it an error.
    context_elimination: bool = True
    context_concepts: Tuple[str, ...] = REFERENCE_CONTEXT_CONCEPTS
    context_required: bool = False
    # Context taken from the vocabulary itself ("peeling"): concepts are built one after the
    # other in ``context_order`` and each eliminates every concept built before it, so no
    # separate context archives are needed. Orders: "given" (vocabulary order, cascades),
    # "archive-size" (larger archives first: ubiquitous stuff before rare things), "confidence"
    # (cascade-proof: every concept is first co-segmented alone and the concepts whose archives
    # agree most on a region claim it first), "ownership" (only concepts whose reference is about
    # their own archive peel, reco.vocabulary), "enrichment" (no order and no peeling: each
    # archive's tokens are weighted by how much commoner their look is in that archive than in
    # any other archive of the vocabulary, reco.enrichment), "others" (no order: each concept
    # peels every other concept's plain co-segmentation reference, reco.vocabulary).
    context_from_vocabulary: bool = False
    context_order: str = "archive-size"
    # Peeling weight of a token: prod_c (1 - sigmoid(T * (cos(f, v_c) - offset))) over the prototypes
    # v_c of the concepts built before. The paper's elimination weight (T = 1, offset = 0, kept
    # below for context archives) lies between 0.27 and 0.73: too flat to remove anything; a
    # sharp weight removes what an earlier concept explains and keeps the rest.
    peel_temperature: float = 20.0
    peel_offset: float = 0.6
    # context_order "ownership" (reco.vocabulary): a concept peels only when its reference claims
    # more of its own archive than of any other concept's archive by more than this margin.
    own_margin: float = 0.0
    # ... and whether owners peel the owners built before them (False: an owner keeps its plain
    # co-segmentation; only the diffuse concepts are built with the owners peeled off).
    owners_peel: bool = True
    # context_order "enrichment" (reco.enrichment): order-free, nothing is peeled. Every archive
    # token p of concept c is weighted by min(1, 2 sigmoid(T * (a_c(p) - max_{c' != c} a_c'(p)))),
    # where a_c'(p) is its co-segmentation score against concept c''s archive (mean over the
    # images of its best match there, its own image excluded) and T = ``enrichment_temperature``:
    # a token another archive is more about fades out, the others keep weight 1.
    enrichment_temperature: float = 100.0
    # ... then every concept is co-segmented once more with the other concepts' enrichment
    # references peeled (``peel_temperature`` / ``peel_offset``; order-free, one step).
    enrichment_peel_others: bool = False
    # The same weight for the paper's context concepts (context archives); the paper: 1 and 0.
    context_temperature: float = 1.0
    context_offset: float = 0.0
    # The paper averages the per-image maxima over all k images including the token's own
    # image; True excludes it (the estimate of "how well does this token match the *other*
    # images"). CV on the crop protocol could not tell them apart (22.69 vs 22.72 with seed
    # regions), so the paper's value is kept; with 1-8 exemplars (VOC) including it measured better.
    exclude_own_image: bool = False
    # Seeds from a region: the top ``seed_tokens`` tokens of every archive image by
    # co-segmentation score (1 = the paper's single seed token).
    seed_tokens: int = 100
    # Several prototypes per concept: spherical k-means of the seed-region features (1 = the
    # paper's single mean reference). Inference takes the best prototype of each concept.
    prototypes: int = 1
    # Per-concept score calibration fitted on the concept's own archive (used by
    # ``SegmenterConfig.calibrate``): "archive" stores the mean and std of the concept's
    # similarity over its archive tokens, so the calibrated logit is z = (cos - mean) / std;
    # "archive-threshold" also moves z = 0 to the concept's own foreground/background boundary in
    # its archive (the co-segmentation's foreground, split by Otsu's method, against the rest):
    # sigmoid(z) = 0.5 then means "as similar as the boundary of the concept's own region", the
    # natural "none of these" threshold; "none": no statistics (the paper).
    calibration: str = "archive"
    # Keep each archive image's contribution to the references in the bank, so an image that is
    # also being labelled can be scored against references built without it
    # (``SegmenterConfig.exclude_own_archive``).
    keep_members: bool = False
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
        if self.seed_tokens < 1:
            raise ConfigError(f"bank.seed_tokens must be >= 1, got {self.seed_tokens}")
        if self.prototypes < 1:
            raise ConfigError(f"bank.prototypes must be >= 1, got {self.prototypes}")
        for name in ("context_temperature", "peel_temperature", "enrichment_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"bank.{name} must be > 0, got {getattr(self, name)}")
        if self.context_order not in CONTEXT_ORDERS:
            raise ConfigError(
                f"bank.context_order must be one of {', '.join(CONTEXT_ORDERS)}, got {self.context_order!r}"
            )
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"bank.calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not isinstance(self.context_concepts, tuple):
            object.__setattr__(self, "context_concepts", tuple(self.context_concepts))


#: BankConfig keys that only act when concepts peel each other (``context_from_vocabulary``).
PEELING_KEYS = frozenset(
    {
        "context_order",
        "peel_temperature",
        "peel_offset",
        "own_margin",
        "owners_peel",
        "enrichment_temperature",
        "enrichment_peel_others",
    }
)


@dataclass(frozen=True)
class SegmenterConfig:
    """Dense inference settings (spec steps 5-6)."""

    image_size: int = 320
    dense_clip: bool = True
    text_temperature: float = 10.0
    # Per-concept calibration: standardise each concept's similarity with the (mean, std) stored
    # in the bank before the sigmoid, so scores of different concepts are comparable. None
    # (default, "auto"): calibrate when a background threshold is set and the bank has the
    # statistics (a threshold on raw cosines means something else for every concept; without a
    # threshold the raw argmax measured better, docs/results.md); True: always (a bank without
    # statistics is refused); False: never (the paper's raw cosine).
    calibrate: Optional[bool] = None
    # If set, a constant "background" class with this score is put first in the label space,
    # so pixels whose best concept score is below it become background (and CRF sees it too).
    # Scores are sigmoid(cos) (raw) or sigmoid(z) (calibrated): with calibration, 0.5 means
    # "below the concept's archive mean".
    background_threshold: Optional[float] = None
    crf: Optional[CRFConfig] = None
    # Images per encoder forward pass (images with the same inference size are batched); with
    # sliding windows, 4 x batch_size windows of one image per pass.
    batch_size: int = 4
    # A bank is refused on encoders other than the ones it was built with (name and weights);
    # experts who know two checkpoints are interchangeable may allow it (logged as a warning).
    allow_encoder_mismatch: bool = False
    # When an image being labelled is itself in a concept's archive (its id is listed there),
    # score it against that concept's references rebuilt without its own seeds (leave-one-out),
    # so pseudo-labelling an archive image does not reward the image for being an exemplar.
    # Needs a bank built with ``bank.keep_members`` and image ids passed to the segmenter.
    exclude_own_archive: bool = False
    # Sliding-window inference: square windows whose side is this fraction of the image's shorter
    # side, evenly spaced about ``window_stride`` of that side apart with both edges flush, each encoded
    # like an archive image (resized to ``window_image_size`` px; None: the bank's
    # ``bank.image_size``); a pixel's score is the mean over the windows that cover it. Archive
    # images are photos *of* a concept, so their tokens look like tokens of a close-up, not of a
    # whole scene: windows put the scene's tokens in that domain (docs/results.md: the tree of a
    # street scene is found at all only this way). None: the whole image at ``image_size`` (the
    # paper's inference: one forward pass instead of 6 at 224 px for a 4:3 image at 0.667). 0.667
    # (2/3) was chosen by leave-one-drive-out cross-validation inside camvid-train among 1/3, 1/2,
    # 2/3, 1 and the whole image (docs/results.md).
    window: Optional[float] = 0.667
    window_stride: float = 0.5
    window_image_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.image_size < 14:
            raise ConfigError(f"segmenter.image_size must be >= 14, got {self.image_size}")
        if self.window is not None and not (0 < self.window <= 1):
            raise ConfigError(
                f"segmenter.window must be in (0, 1] (a fraction of the shorter side) or null, got {self.window}"
            )
        if not (0 < self.window_stride <= 1):
            raise ConfigError(
                f"segmenter.window_stride must be in (0, 1] (a fraction of the window), got {self.window_stride}"
            )
        if self.window_image_size is not None and self.window_image_size < 14:
            raise ConfigError(f"segmenter.window_image_size must be >= 14 or null, got {self.window_image_size}")
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
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        out = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive, fields are checked above
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
    if isinstance(out, BankConfig) and not out.context_from_vocabulary:
        defaults = {f.name: f.default for f in dataclasses.fields(BankConfig)}
        idle = sorted(k for k in set(data) & PEELING_KEYS if getattr(out, k) != defaults[k])
        if idle:
            logger.warning(
                "%s have no effect without %scontext_from_vocabulary: true (off by default: the paper's "
                "context elimination is the default)",
                ", ".join(prefix + k for k in idle),
                prefix,
            )
    return out


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-ready) representation of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _paper_bank() -> BankConfig:
    return BankConfig(
        k=50,
        image_size=224,
        language_guidance=True,
        language_temperature=10.0,
        context_elimination=True,
        context_concepts=REFERENCE_CONTEXT_CONCEPTS,
        context_from_vocabulary=False,  # (so context_order plays no part)
        context_temperature=1.0,
        context_offset=0.0,
        exclude_own_image=False,
        seed_tokens=1,
        prototypes=1,
        calibration="none",
        keep_members=False,
    )


def _paper_segmenter() -> SegmenterConfig:
    return SegmenterConfig(
        image_size=320,
        dense_clip=True,
        text_temperature=10.0,
        calibrate=False,
        background_threshold=None,
        crf=None,
        exclude_own_archive=False,
        window=None,  # the whole image at 320 px
    )


#: Named configurations: ``reco-paper`` is the paper's (spec defaults: context archives for
#: tree/sky/building/road/person, one seed token, one mean reference, raw sigmoid(cos) argmax);
#: ``reco-paper-regions`` is the paper's with a seed region of 100 tokens per archive image, the
#: configuration leave-one-drive-out CV inside camvid-train chose on the crop protocol
#: (``docs/results.md``) with the paper's whole-image inference; ``default`` is ``BankConfig()`` /
#: ``SegmenterConfig()``: that bank, sliding-window inference (also chosen by that CV) and the
#: archive statistics a background threshold needs (which change no reference).
PRESETS = ("reco-paper", "default", "reco-paper-regions")


def preset(name: str) -> Tuple[BankConfig, SegmenterConfig]:
    """(bank config, segmenter config) of a named preset (see :data:`PRESETS`)."""
    if name == "reco-paper":
        return _paper_bank(), _paper_segmenter()
    if name == "reco-paper-regions":
        return dataclasses.replace(_paper_bank(), seed_tokens=100), _paper_segmenter()
    if name in ("default", "best"):
        return BankConfig(), SegmenterConfig()
    raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")


def resolve_context(cfg: BankConfig, available: Iterable[str]) -> Tuple[BankConfig, Tuple[str, ...]]:
    """Match the context concepts of ``cfg`` to the concept names that have an archive.

    A context concept keeps its name when ``available`` holds it, else takes the first of its
    :data:`CONTEXT_ALIASES` that is available (so the context reference and the vocabulary concept
    of that name are one), else it is dropped. Returns (the config with the matched context
    concepts, in order; context elimination off when none is left, the dropped names).

    Raises:
        ConfigError: a context concept has no archive and ``cfg.context_required`` is set.
    """
    if not (cfg.context_elimination and cfg.context_concepts):
        return cfg, ()
    have = set(available)
    named = _aliased(cfg.context_concepts, have)
    matched = tuple(dict.fromkeys(c for c in named if c in have))
    dropped = tuple(c for c in named if c not in have)
    if dropped and not cfg.context_required:
        logger.warning("context concepts without an archive are left out: %s", ", ".join(dropped))
    if dropped and cfg.context_required:
        raise ConfigError(
            f"context elimination needs archives for the context concepts {list(dropped)}: give them "
            "(exemplar folders or an index), change bank.context_concepts, set "
            "bank.context_required: false to leave them out, or bank.context_elimination: false"
        )
    if matched == cfg.context_concepts:
        return cfg, dropped
    return dataclasses.replace(cfg, context_concepts=matched, context_elimination=bool(matched)), dropped


def _aliased(concepts: Iterable[str], names: set) -> list:
    return [c if c in names else next((a for a in CONTEXT_ALIASES.get(c, ()) if a in names), c) for c in concepts]


def alias_context(cfg: BankConfig, names: Iterable[str]) -> BankConfig:
    """The context concepts renamed to the alias ``names`` holds where it lacks the name itself
    (``person`` -> ``pedestrian``), nothing dropped: before retrieving the context archives, so a
    vocabulary concept and the context concept it stands for share one archive and one reference."""
    if not (cfg.context_elimination and cfg.context_concepts):
        return cfg
    renamed = tuple(dict.fromkeys(_aliased(cfg.context_concepts, set(names))))
    return cfg if renamed == cfg.context_concepts else dataclasses.replace(cfg, context_concepts=renamed)


def config_hash(obj: Any) -> str:
    """A short, stable digest of a config dataclass (or any JSON-ready value)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "CALIBRATIONS",
    "CONTEXT_ORDERS",
    "PRESETS",
    "preset",
    "resolve_context",
    "alias_context",
    "CONTEXT_ALIASES",
    "config_hash",
    "BankConfig",
    "CRFConfig",
    "SegmenterConfig",
    "REFERENCE_CONTEXT_CONCEPTS",
    "from_dict",
    "to_dict",
]
