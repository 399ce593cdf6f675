import pytest
import torch
from torch import nn

from pipeline.fold.batchnorm import FoldError, fold_bn, fold_bn_


@pytest.mark.parametrize("fixture", ["tiny_net", "tiny_bounded_net"])
def test_folded_equals_unfolded(fixture, request):
    model = request.getfixturevalue(fixture)
    x = torch.randn(4, 3, 9, 9)
    folded, report = fold_bn(model, x)
    assert len(report.folded) == 5  # every conv->BN pair of TinyNet
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    ref = model(x)
    assert torch.allclose(folded(x), ref, atol=1e-5 * ref.abs().max().item())


def test_fold_refuses_training_mode(tiny_net):
    with pytest.raises(FoldError, match="eval-mode"):
        fold_bn_(tiny_net.train())


def test_bn_with_two_consumers_is_not_folded():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = TwoUsers().eval()
    folded, report = fold_bn(model, torch.randn(2, 3, 6, 6))
    assert report.folded == () and report.kept == ("bn",)
