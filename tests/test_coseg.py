import pytest
import torch
import torch.nn.functional as F

from reco.coseg import coseg_scores, coseg_scores_dense, cosegment


def _unit(*xs):
    return F.normalize(torch.tensor(xs, dtype=torch.float32), dim=0)


def toy_three_images():
    """Three images of 1x2 tokens. Object x is in every image (slightly perturbed in images 1
    and 2); distractor y is in images 0 and 2 only; image 1's other token is z.
    Seeds by construction: token 1 (the object) in image 0, token 0 in image 1, token 1 in image 2."""
    x = _unit(1, 0, 0, 0, 0)
    y = _unit(0, 1, 0, 0, 0)
    z = _unit(0, 0, 1, 0, 0)
    a1 = _unit(1, 0, 0, 0.2, 0)
    a2 = _unit(1, 0, 0, 0, 0.2)
    img0 = torch.stack([y, x])  # distractor first so that a tie would pick it
    img1 = torch.stack([a1, z])
    img2 = torch.stack([y, a2])
    feats = torch.stack([img0, img1, img2])  # (k=3, n=2, D)
    return feats.permute(0, 2, 1).reshape(3, 5, 1, 2)  # (k, D, h=1, w=2)


def buggy_reference_scores(features):
    """The public reference code's slicing: image j's columns are start:start+end."""
    k, d, h, w = features.shape
    n = h * w
    flat = F.normalize(features.permute(0, 2, 3, 1).reshape(k * n, d), dim=-1)
    adj = flat @ flat.T
    grid = torch.zeros(k * n, k)
    start = 0
    for j in range(k):
        end = start + n
        grid[:, j] = adj[:, start : start + end].max(dim=1).values
        start = end
    return grid.mean(dim=1).reshape(k, h, w)


def test_toy_seeds_are_the_object():
    feats = toy_three_images()
    res = cosegment(feats, block_size=1)
    assert res.seed_index.tolist() == [1, 0, 1]
    expected_ref = F.normalize(
        F.normalize(feats.permute(0, 2, 3, 1).reshape(3, 2, 5), dim=-1)[[0, 1, 2], [1, 0, 1]].mean(0), dim=0
    )
    assert torch.allclose(res.reference, expected_ref, atol=1e-6)
    assert abs(res.reference.norm().item() - 1) < 1e-6


def test_reference_slicing_bug_picks_the_distractor():
    """Shows the toy discriminates: the buggy slicing puts image 0's seed on the distractor."""
    feats = toy_three_images()
    buggy_seed0 = buggy_reference_scores(feats)[0].reshape(-1).argmax().item()
    assert buggy_seed0 == 0
    assert cosegment(feats).seed_index[0].item() == 1


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
@pytest.mark.parametrize("exclude", [False, True])
def test_blockwise_equals_dense(block, exclude):
    torch.manual_seed(0)
    feats = torch.randn(5, 16, 3, 4)
    weights = torch.rand(5, 3, 4)
    dense = coseg_scores_dense(feats, weights, exclude_own_image=exclude)
    blocked = coseg_scores(feats, weights, block_size=block, exclude_own_image=exclude)
    assert torch.allclose(dense, blocked, atol=1e-5)


def test_scores_match_definition_by_loops():
    torch.manual_seed(1)
    feats = torch.randn(3, 8, 2, 2)
    w = torch.rand(3, 2, 2)
    f = F.normalize(feats.permute(0, 2, 3, 1).reshape(3, 4, 8), dim=-1)
    wf = w.reshape(3, 4)
    expected = torch.zeros(3, 4)
    for i in range(3):
        for p in range(4):
            expected[i, p] = (
                sum(max(float(f[i, p] @ f[j, q]) * float(wf[j, q]) for q in range(4)) for j in range(3)) / 3
            )
    assert torch.allclose(coseg_scores(feats, w, block_size=3), expected.reshape(3, 2, 2), atol=1e-5)


def test_exclude_own_image_single_image_falls_back():
    feats = torch.randn(1, 8, 2, 2)
    # with one image every token matches itself (score 1): no seed preference, no crash
    s = coseg_scores(feats, exclude_own_image=True)
    assert torch.allclose(s, torch.ones(1, 2, 2), atol=1e-5)


def test_exclude_own_image_removes_self_match():
    feats = toy_three_images()
    s = coseg_scores(feats, exclude_own_image=True)
    # distractor y in image 0 matches image 2 (1.0) and nothing in image 1 (0.0)
    assert abs(s[0, 0, 0].item() - 0.5) < 1e-5


def test_weights_move_the_seed():
    feats = toy_three_images()
    w = torch.ones(3, 1, 2)
    w[1, 0, 0] = 0.0  # hide the object in image 1
    w[2, 0, 1] = 0.0  # and in image 2: now the distractor y is what images share
    res = cosegment(feats, w)
    assert res.seed_index[0].item() == 0


def test_bad_inputs():
    with pytest.raises(ValueError):
        cosegment(torch.randn(8, 2, 2))
    with pytest.raises(ValueError):
        cosegment(torch.randn(2, 8, 2, 2), torch.full((2, 2, 2), 2.0))
    with pytest.raises(ValueError):
        coseg_scores(torch.randn(2, 8, 2, 2), torch.ones(3, 2, 2))
