"""Corpus access, embedding store and retrieval (FAISS lives here, never in ``reco``)."""

from .readers import ReadReport, list_images, read_image, read_images
from .retriever import ExactRetriever, Retriever, SearchResult
from .sources import IMAGE_EXTENSIONS, Item, fetch_bytes, list_source

__all__ = [
    "IMAGE_EXTENSIONS",
    "Item",
    "ReadReport",
    "fetch_bytes",
    "list_images",
    "list_source",
    "read_image",
    "read_images",
    "ExactRetriever",
    "Retriever",
    "SearchResult",
]
