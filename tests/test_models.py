from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_spectral.models import GPT, MLP, MODEL_REGISTRY, ResNet18, SmallCNN, get_model

IMAGE_MODELS = ("mlp", "resnet18", "small_cnn")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert MODEL_REGISTRY == {"mlp": MLP, "small_cnn": SmallCNN, "resnet18": ResNet18, "gpt": GPT}


@pytest.mark.parametrize(
    ("name", "expected"),
    # Parameter counts at width 1 on CIFAR-10 input: MLP 3072-256-256-10, SmallCNN, ResNet-18 (He et al. 2016).
    [("mlp", 855_050), ("small_cnn", 1_070_794), ("resnet18", 11_173_962)],
)
def test_parameter_counts(name: str, expected: int) -> None:
    assert n_params(get_model(name)) == expected


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (1, 8), (3, 30)])
def test_output_shape_for_each_input(name: str, channels: int, size: int) -> None:
    model = get_model(name, num_classes=7, width_mult=0.25, in_channels=channels, image_size=size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_width_mult_scales_widths_by_truncation() -> None:
    cnn = SmallCNN(width_mult=0.5)
    assert (cnn.features[0].out_channels, cnn.features[2].out_channels, cnn.fc1.out_features) == (16, 32, 128)
    assert MLP(width_mult=1.5).layers[1].out_features == 384
    assert ResNet18(width_mult=0.3).conv1.out_channels == 19  # int(64 * 0.3)


def test_resnet18_is_the_cifar_variant() -> None:
    net = ResNet18()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    assert [stage[0].conv1.stride[0] for stage in (net.layer1, net.layer2, net.layer3, net.layer4)] == [1, 2, 2, 2]


def test_mlp_depth_and_activation() -> None:
    mlp = MLP(num_layers=1, in_channels=1, image_size=8)
    assert [type(m) for m in mlp.layers] == [nn.Flatten, nn.Linear]
    assert isinstance(MLP(activation="gelu").layers[2], nn.GELU)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: get_model("vit"), "unknown model 'vit'"),
        (lambda: SmallCNN(image_size=3), "image_size must be >= 4"),
        (lambda: ResNet18(image_size=0), "image_size must be >= 1"),
        (lambda: MLP(width_mult=0.001), "down to 0"),
        (lambda: MLP(width_mult=0.0), "width_mult must be > 0"),
        (lambda: MLP(num_layers=0), "num_layers"),
        (lambda: MLP(activation="tanh"), "activation"),
        (lambda: SmallCNN(in_channels=0), "in_channels"),
    ],
)
def test_bad_arguments_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_mlp_explicit_hidden_sizes_without_bias() -> None:
    """An MLP 3072-128-64-10 without biases (widths scaled by width_mult)."""
    model = MLP(hidden_sizes=[128, 64], bias=False)
    assert [tuple(p.shape) for p in model.parameters()] == [(128, 3072), (64, 128), (10, 64)]
    half = MLP(hidden_sizes=[128, 64], width_mult=0.5)
    assert [tuple(p.shape) for p in half.parameters() if p.ndim == 2] == [(64, 3072), (32, 64), (10, 32)]
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLP(hidden_sizes=[])


@pytest.mark.parametrize(
    ("kwargs", "features"),
    [({"input_shape": (40,)}, 40), ({"input_shape": [2, 5, 3]}, 30), ({"in_features": 17}, 17),
     ({"in_channels": 1, "image_size": 8}, 64), ({"input_shape": (40,), "in_features": 40, "in_channels": 9}, 40)],
)
def test_mlp_takes_any_input_shape(kwargs: dict, features: int) -> None:
    """The input is flattened: input_shape, else in_features, else in_channels·image_size²."""
    mlp = MLP(num_classes=3, num_layers=2, **kwargs)
    assert mlp.layers[1].in_features == features == mlp.in_features and mlp.num_classes == 3
    shape = kwargs.get("input_shape") or ((features,) if "in_features" in kwargs else (1, 8, 8))
    assert mlp(torch.randn(5, *shape)).shape == (5, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"input_shape": (40,), "in_features": 41}, "disagrees"), ({"input_shape": ()}, "input_shape"),
     ({"input_shape": (3, 0)}, "input_shape"), ({"in_features": 0}, "in_features")],
)
def test_mlp_bad_input_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLP(**kwargs)
