import math

import pytest
import torch

from reco.metrics import ConfusionMatrix


def test_against_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, target)
    # rows = truth, cols = prediction; the 255 pixel is ignored
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    assert torch.equal(cm.matrix, expected)
    m = cm.compute(["a", "b", "c"])
    # IoU: a = 1/(2+2-1)=1/3, b = 2/(3+3-2)=1/2, c = 1/(2+2-1)=1/3
    assert m.iou == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert m.miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m.pixel_accuracy == pytest.approx(4 / 7)
    assert m.as_dict()["iou"]["b"] == pytest.approx(0.5)


def test_running_accumulation_and_absent_classes_are_nan():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    m = cm.compute()
    assert math.isnan(m.iou[2]) and math.isnan(m.iou[3])
    assert m.miou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m.pixel_accuracy == pytest.approx(3 / 4)


def test_bad_inputs():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError):
        cm.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0]), torch.tensor([5]))
