"""Corpus access, embedding store and retrieval (FAISS lives here, never in ``reco``)."""
from .readers import IMAGE_EXTENSIONS, ReadReport, list_images, read_bytes, read_image
from .retriever import ExactRetriever, Retriever, SearchResult

__all__ = ["IMAGE_EXTENSIONS", "ReadReport", "list_images", "read_bytes", "read_image",
           "ExactRetriever", "Retriever", "SearchResult"]
