import torch
import torch.nn.functional as F

from reco.weighting import context_weights, language_weights


def test_language_weights_follow_text_similarity():
    text = torch.tensor([1.0, 0.0, 0.0])
    dense = torch.zeros(2, 3, 2, 2)
    dense[:, 0, 0, 0] = 1.0  # token (0,0) is the concept
    dense[:, 1, 0, 1] = 1.0  # token (0,1) is orthogonal
    dense[:, 0, 1, :] = -1.0  # row 1 is the opposite
    w = language_weights(dense, text, (2, 2), temperature=10.0)
    assert w.shape == (2, 2, 2)
    assert torch.allclose(w[:, 0, 0], torch.sigmoid(torch.tensor(10.0)))
    assert torch.allclose(w[:, 0, 1], torch.tensor(0.5))
    assert (w[:, 1] < 1e-4).all()


def test_language_weights_resize_to_token_grid():
    w = language_weights(torch.randn(3, 8, 4, 4), torch.randn(8), (7, 5))
    assert w.shape == (3, 7, 5) and (w >= 0).all() and (w <= 1).all()


def test_context_weights_suppress_context_tokens():
    sky = F.normalize(torch.tensor([0.0, 1.0, 0.0, 0.0]), dim=0)
    feats = torch.zeros(1, 4, 1, 2)
    feats[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # object token
    feats[0, :, 0, 1] = sky  # sky token
    w = context_weights(feats, sky[None])
    assert w[0, 0, 1] < w[0, 0, 0]
    assert torch.allclose(w[0, 0, 0], 1 - torch.sigmoid(torch.tensor(0.0)))
    assert torch.allclose(w[0, 0, 1], 1 - torch.sigmoid(torch.tensor(1.0)))


def test_context_weights_multiply_over_concepts_and_empty_is_one():
    feats = torch.randn(2, 4, 3, 3)
    refs = torch.randn(3, 4)
    all_three = context_weights(feats, refs)
    prod = context_weights(feats, refs[:1]) * context_weights(feats, refs[1:2]) * context_weights(feats, refs[2:])
    assert torch.allclose(all_three, prod, atol=1e-6)
    assert torch.equal(context_weights(feats, torch.empty(0, 4)), torch.ones(2, 3, 3))
