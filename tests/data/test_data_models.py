import pytest
import torch

from pipeline.config import DataConfig, ModelConfig
from pipeline.data.datasets import DEBIAN_FASHION_MNIST, DataError, load_data
from pipeline.models.zoo import ModelError, build_model


def test_digits_are_real_and_resized():
    data = load_data(DataConfig(name="digits", image_size=16, batch_size=32))
    x, y = next(iter(data.train))
    assert x.shape == (32, 1, 16, 16) and data.num_classes == 10
    assert len(data.train.dataset) + len(data.test.dataset) == 1797
    assert y.unique().numel() > 5


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="needs data.root"):
        load_data(DataConfig(name="imagefolder"))


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_fashion_mnist_from_debian_package():
    data = load_data(DataConfig(name="fashion_mnist", image_size=28))
    assert len(data.train.dataset) == 60000 and len(data.test.dataset) == 10000


@pytest.mark.parametrize("name", ["vgg", "resnet20", "torchvision:resnet18"])
def test_models_build_and_run(name):
    model = build_model(ModelConfig(name=name, width=0.25), num_classes=7, in_channels=3).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_lists_choices():
    with pytest.raises(ModelError, match="torchvision:<name>"):
        build_model(ModelConfig(name="nope"), num_classes=10, in_channels=3)
    with pytest.raises(ModelError, match="resnet18"):
        build_model(ModelConfig(name="torchvision:nope"), num_classes=10, in_channels=3)
