"""ReCo (Retrieve and Co-segment) in plain torch: no Ray, no FAISS.

Facades: :class:`ConceptBank` (reference embeddings of named concepts) and :class:`Segmenter`
(dense inference). Encoders come from :func:`create_encoder` / :func:`create_dense_encoder` /
:func:`create_clip`.
"""

from .bank import ConceptBank, ConceptBuilder, ConceptReference
from .config import BankConfig, CRFConfig, SegmenterConfig
from .coseg import CosegResult, coseg_scores, cosegment
from .encoders import (
    DENSE_ENCODERS,
    ClipModel,
    DenseEncoder,
    create_clip,
    create_dense_encoder,
    create_encoder,
    list_dense_encoders,
)
from .errors import (
    ClipUnavailableError,
    ConfigError,
    EmptyArchiveError,
    ImageDecodeError,
    ReCoError,
    UnknownConceptError,
    WeightsError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from .metrics import ConfusionMatrix, SegMetrics
from .segmenter import SegmentationOutput, Segmenter

__version__ = "0.1.0"

__all__ = [
    "BankConfig",
    "CRFConfig",
    "SegmenterConfig",
    "ClipModel",
    "ClipUnavailableError",
    "ConceptBank",
    "ConceptBuilder",
    "ConceptReference",
    "ConfigError",
    "ConfusionMatrix",
    "CosegResult",
    "DENSE_ENCODERS",
    "DenseEncoder",
    "EmptyArchiveError",
    "ImageDecodeError",
    "ReCoError",
    "SegMetrics",
    "SegmentationOutput",
    "Segmenter",
    "UnknownConceptError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "coseg_scores",
    "cosegment",
    "create_clip",
    "create_dense_encoder",
    "create_encoder",
    "list_dense_encoders",
]
