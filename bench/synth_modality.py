"""Synthetic CLIP-like embeddings with the modality gap, on a continuum corpus (#17.5).

Why not Gaussian blobs: well-separated clusters make every IVF index look perfect (a query's
neighbours all sit in its nearest centroid's list). CLIP image embeddings are a continuum (any
two photos are partly alike) inside a narrow cone, and text embeddings sit in *another* cone:
a caption's cosine with its own images is only ~0.2-0.35, while image-image cosines are higher
(~0.5 for unrelated photos, more for related ones). A text query therefore lands far from the
image cloud, where IVF centroids and PQ codebooks trained on images fit it badly.

Model (all directions random, fixed by ``seed``)::

    semantic content   s ~ N(0, I_r)                 one continuous latent space, no clusters
    image embedding    x = a_img u_img + b_img B s_x + c_img e        s_x = s_concept + sigma z
    text embedding     t = a_txt u_txt + b_txt B s_c + c_txt e

with ``u_img``, ``u_txt`` the two modality mean directions (the gap), ``B`` a random (D, r)
orthonormal basis (semantic directions shared by both modalities), ``e`` isotropic noise, every
vector L2-normalised. Images are drawn around concept latents (each image's latent is a
concept's plus ``sigma`` noise, concepts themselves N(0, I)): in cosine the concepts overlap (an
image's cosine with unrelated images is 0.4, with its own concept's 0.7, no gap between the two
populations), but in the 48-d latent space concepts are ~9.8 apart and an image ~4.2 from its
concept, so with many images per concept an IVF list can hold about one concept and the corpus
behaves like clusters. Use few images per concept (~10: IVF lists then hold many concepts) to
get the continuum the benchmark needs. :func:`cosine_stats` measures what it reproduces; ``bench/README.md``
lists the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np


@dataclass(frozen=True)
class ModalityGap:
    dim: int = 512
    rank: int = 48  # semantic directions
    sigma: float = 0.6  # spread of an image's latent around its concept (continuum)
    a_img: float = 0.70  # weight of the image mean direction
    b_img: float = 0.62
    c_img: float = 0.48
    a_txt: float = 0.78  # weight of the text mean direction
    b_txt: float = 0.40
    c_txt: float = 0.44
    gap_cos: float = 0.20  # cosine between the two modality mean directions
    seed: int = 0

    def _frame(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        q, _ = np.linalg.qr(rng.normal(size=(self.dim, self.rank + 2)))
        u_img, v, basis = q[:, 0], q[:, 1], q[:, 2:]
        u_txt = self.gap_cos * u_img + np.sqrt(1 - self.gap_cos**2) * v
        return u_img, u_txt, basis

    def _embed(
        self, a: float, b: float, c: float, u: np.ndarray, latents: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        _, _, basis = self._frame()
        sem = latents @ basis.T / np.sqrt(self.rank)
        noise = rng.normal(size=(len(latents), self.dim)) / np.sqrt(self.dim)
        x = a * u[None] + b * sem + c * noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def concepts(self, n: int, seed: int = 1) -> np.ndarray:
        return np.random.default_rng((self.seed, seed)).normal(size=(n, self.rank))

    def images(self, n: int, concepts: np.ndarray, seed: int = 2) -> Tuple[np.ndarray, np.ndarray]:
        """(n, dim) image embeddings and the concept each was drawn around."""
        rng = np.random.default_rng((self.seed, seed))
        which = rng.integers(0, len(concepts), n)
        lat = concepts[which] + self.sigma * rng.normal(size=(n, self.rank))
        u_img, _, _ = self._frame()
        return self._embed(self.a_img, self.b_img, self.c_img, u_img, lat, rng), which

    def texts(self, concepts: np.ndarray, seed: int = 3) -> np.ndarray:
        rng = np.random.default_rng((self.seed, seed))
        _, u_txt, _ = self._frame()
        return self._embed(self.a_txt, self.b_txt, self.c_txt, u_txt, concepts, rng)

    def corpus(self, n: int, n_concepts: int, n_text: int, chunk: int = 200_000, seed: int = 0):
        """Yields (image chunk) for ``n`` images over ``n_concepts`` concepts; ``.texts`` of the
        first ``n_text`` concepts are the text-like queries (see :func:`make`)."""
        cons = self.concepts(n_concepts)
        for i, a in enumerate(range(0, n, chunk)):
            yield self.images(min(chunk, n - a), cons, seed=1000 + seed * 7919 + i)[0]


def make(n: int, n_concepts: int, n_text: int, gap: ModalityGap = ModalityGap()) -> Tuple[np.ndarray, np.ndarray]:
    """(images (n, dim), text-like queries (n_text, dim)) in memory (small corpora, tests)."""
    cons = gap.concepts(n_concepts)
    return gap.images(n, cons)[0], gap.texts(cons[:n_text])


def cosine_stats(gap: ModalityGap = ModalityGap(), n: int = 4000, n_concepts: int = 400) -> Dict[str, float]:
    """Mean cosines: text with images of its own concept, text with random images, image with
    images of the same concept, image with random images, text with other texts."""
    cons = gap.concepts(n_concepts)
    img, which = gap.images(n, cons)
    txt = gap.texts(cons)
    rng = np.random.default_rng(9)
    pairs = rng.integers(0, n, (20000, 2))
    same = [(i, j) for i, j in pairs if which[i] == which[j] and i != j]
    own = np.einsum("ne,ne->n", txt[which], img)
    rand_t = np.einsum("ne,ne->n", txt[rng.integers(0, n_concepts, n)], img)
    ii = np.einsum("ne,ne->n", img[pairs[:, 0]], img[pairs[:, 1]])
    same_ii = [float(img[i] @ img[j]) for i, j in same[:2000]] or [float("nan")]
    tt = txt[rng.integers(0, n_concepts, 2000)] @ txt[rng.integers(0, n_concepts, 2000)].T
    return {
        "text_image_own": float(own.mean()),
        "text_image_random": float(rand_t.mean()),
        "image_image_same_concept": float(np.mean(same_ii)),
        "image_image_random": float(ii.mean()),
        "text_text_random": float(tt.mean()),
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(cosine_stats(), indent=2))
