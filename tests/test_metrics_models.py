"""Many/Medium/Few by training count, and the backbones' shapes."""
import math

import numpy as np
import pytest
import torch

from glag.metrics import class_groups, per_class_accuracy, summarize
from glag.models import create_model


def test_groups_follow_train_counts_not_class_index():
    counts = [5, 500, 20, 100, 101, 19]
    g = class_groups(counts)
    assert g["many"].tolist() == [1, 4]
    assert g["medium"].tolist() == [2, 3]
    assert g["few"].tolist() == [0, 5]


def test_summarize_by_hand():
    counts = [200, 50, 5]
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 1, 1])
    m = summarize(pred, labels, counts)
    assert m["top1"] == pytest.approx(100 * 3 / 6)
    assert m["many"] == pytest.approx(100.0)
    assert m["medium"] == pytest.approx(50.0)
    assert m["few"] == pytest.approx(0.0)
    acc = per_class_accuracy(pred, labels, 4)
    assert acc[:3].tolist() == [1.0, 0.5, 0.0] and math.isnan(acc[3])
    # a group without classes is NaN, not zero
    assert math.isnan(summarize(pred, labels, [200, 200, 200])["few"])


@pytest.mark.parametrize("arch,cin,size,dim", [("resnet32", 1, 28, 64), ("resnet32", 3, 32, 64),
                                               ("resnet10", 3, 64, 512)])
def test_backbones(arch, cin, size, dim):
    torch.manual_seed(0)
    m = create_model(arch, 7, cin).eval()
    x = torch.randn(2, cin, size, size)
    f, z = m.forward_both(x)
    assert f.shape == (2, dim) and z.shape == (2, 7)
    assert (f >= 0).all()  # post-ReLU pooled features: Tukey's power transform needs this
    assert torch.allclose(m(x), z, atol=1e-6)
    assert torch.allclose(m.head(f), z, atol=1e-6)


def test_resnet32_has_the_literature_parameter_count():
    m = create_model("resnet32", 100, 3)
    # ResNet-32 for CIFAR-100 has ~0.47 M parameters (He et al. 2016, option B shortcuts)
    n = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n < 0.50e6


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("vgg", 10)
