"""Inference numerics: the score formula pinned on known inputs, and float32 under bf16 autocast."""

import math

import torch
import torch.nn.functional as F
from conftest import make_image

from reco import ConceptBank, Segmenter, SegmenterConfig
from reco.coseg import cosegment
from reco.inference import combine_scores, reference_similarity, text_similarity
from reco.weighting import language_weights


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_combine_scores_is_sigmoid_cos_times_sigmoid_10_cos_on_known_inputs():
    # one token, two concepts; features and references chosen so the cosines are known exactly
    feats = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    refs = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cos = 1.0 and 0.6
    clip = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    text = torch.tensor([[0.0, 0.5, math.sqrt(0.75)], [0.0, -1.0, 0.0]])  # cos = 0.5 and -1.0
    ref_cos = reference_similarity(feats, refs)
    txt_cos = text_similarity(clip, text)
    assert torch.allclose(ref_cos.flatten(), torch.tensor([1.0, 0.6]), atol=1e-6)
    assert torch.allclose(txt_cos.flatten(), torch.tensor([0.5, -1.0]), atol=1e-6)
    s = combine_scores(ref_cos, (1, 1), txt_cos, text_temperature=10.0).flatten()
    expected = torch.tensor([_sig(1.0) * _sig(5.0), _sig(0.6) * _sig(-10.0)])
    assert torch.allclose(s, expected, atol=1e-6)
    # without dense CLIP the score is sigmoid(cos) alone
    assert torch.allclose(combine_scores(ref_cos, (1, 1)).flatten(), torch.tensor([_sig(1.0), _sig(0.6)]), atol=1e-6)
    # upsampling is bilinear to the requested size and keeps constant maps constant
    up = combine_scores(ref_cos, (3, 5), txt_cos)
    assert up.shape == (1, 2, 3, 5) and torch.allclose(up[0, :, 2, 4], expected, atol=1e-6)


def test_similarities_stay_float32_under_bf16_autocast():
    """Under autocast, einsum runs in bf16 unless switched off: the argmax then flips for
    concepts whose cosines differ in the third decimal. All inference math must be float32."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 64, 16, 16, generator=g)
    base = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    refs = F.normalize(base + 1e-3 * torch.randn(40, 64, generator=g), dim=1)  # near-identical concepts
    plain = combine_scores(reference_similarity(feats, refs), (32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_sim = reference_similarity(feats, refs)
        auto = combine_scores(auto_sim, (32, 32))
        auto_text = text_similarity(feats, refs)
    assert auto_sim.dtype == torch.float32 and auto.dtype == torch.float32 and auto_text.dtype == torch.float32
    assert torch.equal(plain.argmax(1), auto.argmax(1))
    assert torch.allclose(plain, auto, atol=1e-6)


class _FixedFeatures(torch.nn.Module):
    """A dense encoder stand-in returning the same features for any image (so only the
    segmenter's own math can change under autocast)."""

    name, weights, patch_size = "fixed", "fixed", 8

    def __init__(self, feats):
        super().__init__()
        self.feats = torch.nn.Parameter(feats, requires_grad=False)
        self.embed_dim = feats.shape[1]

    def normalize(self, x):
        return x

    def forward(self, x):
        return self.feats.expand(x.shape[0], -1, -1, -1)


def test_segmenter_labels_unchanged_by_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 64, 8, 8, generator=g)
    base = F.normalize(torch.randn(1, 64, generator=g), dim=1)
    refs = F.normalize(base + 1e-3 * torch.randn(30, 64, generator=g), dim=1)
    bank = ConceptBank(tuple(f"c{i}" for i in range(30)), refs)
    seg = Segmenter(bank, _FixedFeatures(feats), None, SegmenterConfig(image_size=64))
    img = make_image(3, (64, 64))
    ref = seg(img)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg(img)[0]
    assert out.scores.dtype == torch.float32
    assert torch.equal(out.labels, ref.labels)
    assert len(ref.labels.unique()) > 3  # the toy really has competing concepts


def test_language_guidance_moves_the_seed_to_the_text_matched_region():
    """Toy archive of 3 images, 2x2 tokens each. Tokens 0 are a shared distractor (identical in
    every image: the most self-similar region), tokens 3 are the concept (similar, not equal).
    Without language guidance the seeds land on the distractor; with dense CLIP agreeing with
    the concept's text on tokens 3, they move there."""
    k, d = 3, 8
    feats = torch.zeros(k, d, 2, 2)
    distractor = F.normalize(torch.ones(d), dim=0)
    for i in range(k):
        feats[i, :, 0, 0] = distractor
        obj = torch.zeros(d)
        obj[0], obj[1 + i] = 1.0, 0.5
        feats[i, :, 1, 1] = obj
        feats[i, :, 0, 1] = torch.eye(d)[4 + i]
        feats[i, :, 1, 0] = -distractor
    plain = cosegment(feats)
    assert plain.seed_index.tolist() == [0, 0, 0]
    text = torch.tensor([1.0, 0.0, 0.0])
    clip = torch.zeros(k, 3, 2, 2)
    clip[:, 0, 1, 1] = 1.0  # concept tokens match the text
    clip[:, 1, 0, 0] = 1.0  # distractor is orthogonal to it
    clip[:, 2, 0, 1] = 1.0
    clip[:, 2, 1, 0] = 1.0
    w = language_weights(clip, text, (2, 2), temperature=10.0)
    guided = cosegment(feats, w)
    assert guided.seed_index.tolist() == [3, 3, 3]
    assert F.cosine_similarity(guided.reference, feats[:, :, 1, 1].mean(0), dim=0) > 0.99
