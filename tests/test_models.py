"""Model factories: the BN article's MLPs layer for layer, and image models on every input size."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from sweep.config import ConfigError
from sweep.data import digits
from sweep.models import ACTIVATIONS, build_model, cnn, mlp, model_factory, resnet18

CONF = Path(__file__).parents[1] / "conf"


class net_class2(nn.Module):  # noqa: N801
    """The BN article's two-hidden-layer network, verbatim apart from formatting."""

    def __init__(self, act_fun=torch.relu, in_features=2, n_hidden1=4, n_hidden2=4,
                 out_features=1, bias=True, BN_model=None, momentum=0.1):  # noqa: N803
        super().__init__()
        self.linear1 = nn.Linear(in_features, n_hidden1, bias=bias)
        self.normalize1 = nn.BatchNorm1d(n_hidden1, momentum=momentum)
        self.linear2 = nn.Linear(n_hidden1, n_hidden2, bias=bias)
        self.normalize2 = nn.BatchNorm1d(n_hidden2, momentum=momentum)
        self.linear3 = nn.Linear(n_hidden2, out_features, bias=bias)
        self.BN_model = BN_model
        self.act_fun = act_fun

    def forward(self, x):
        if self.BN_model is None:
            z1 = self.linear1(x)
            p1 = self.act_fun(z1)
            z2 = self.linear2(p1)
            p2 = self.act_fun(z2)
            out = self.linear3(p2)
        elif self.BN_model == "pre":
            z1 = self.normalize1(self.linear1(x))
            p1 = self.act_fun(z1)
            z2 = self.normalize2(self.linear2(p1))
            p2 = self.act_fun(z2)
            out = self.linear3(p2)
        elif self.BN_model == "post":
            z1 = self.linear1(x)
            p1 = self.act_fun(z1)
            z2 = self.linear2(self.normalize1(p1))
            p2 = self.act_fun(z2)
            out = self.linear3(self.normalize2(p2))
        return out


def copy_article_weights(article, net):
    """Copy the article net's Linear and BatchNorm parameters, in order, into our Sequential."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    norms = [m for m in net if isinstance(m, nn.BatchNorm1d)]
    for ours, theirs in zip(linears, [article.linear1, article.linear2, article.linear3],
                            strict=True):
        ours.load_state_dict(theirs.state_dict())
    for ours, theirs in zip(norms, [article.normalize1, article.normalize2][:len(norms)],
                            strict=True):
        ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("bn", ["none", "pre", "post"])
def test_mlp_puts_batchnorm_exactly_where_the_article_does(bn):
    torch.manual_seed(0)
    article = net_class2(act_fun=torch.tanh, in_features=5, BN_model=None if bn == "none" else bn,
                         momentum=0.3)
    for norm in (article.normalize1, article.normalize2):  # non-trivial affine parameters
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    net = mlp((5,), 1, hidden=(4, 4), activation="tanh", bn=bn, bn_momentum=0.3)
    copy_article_weights(article, net)
    x = torch.randn(32, 5)

    article.train(), net.train()
    assert torch.allclose(net(x), article(x), atol=1e-6)
    if bn != "none":  # same running statistics: same BN inputs and momentum
        assert torch.allclose(net[3 if bn == "post" else 2].running_mean,
                              article.normalize1.running_mean)
    article.eval(), net.eval()
    assert torch.allclose(net(x), article(x), atol=1e-6)


@pytest.mark.parametrize("bn, layers", [
    ("none", "Flatten Linear Tanh Linear Tanh Linear Tanh Linear"),
    ("pre", "Flatten Linear BN Tanh Linear BN Tanh Linear BN Tanh Linear"),
    ("post", "Flatten Linear Tanh BN Linear Tanh BN Linear Tanh BN Linear"),
])
def test_mlp_layer_order_and_parameter_names(bn, layers):
    net = mlp((5,), 1, hidden=(4, 4, 4), bn=bn)  # the article's net_class3
    names = [type(m).__name__.replace("BatchNorm1d", "BN") for m in net]
    assert " ".join(names) == layers
    assert next(iter(dict(net.named_parameters()))) == "1.weight"  # first Linear, any dataset
    assert next(iter(dict(mlp((1, 8, 8), 10).named_parameters()))) == "1.weight"


FUNCTIONAL = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
              "leaky_relu": F.leaky_relu, "elu": F.elu, "gelu": F.gelu, "silu": F.silu}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation(activation):
    net = mlp((3,), 2, hidden=(6,), activation=activation)
    x = torch.randn(8, 3)
    assert torch.allclose(net(x), net[3](FUNCTIONAL[activation](net[1](x))))


def test_invalid_bn_and_activation_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"model.bn='middle' .*none, pre, post"):
        mlp((5,), 1, bn="middle")
    with pytest.raises(ConfigError, match=r"model.activation='swish' .*tanh, relu, sigmoid"):
        mlp((5,), 1, activation="swish")
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / "mlp.yaml"), {"bn": "middle"})
    with pytest.raises(ConfigError, match=r"model.bn='middle'"):  # not Hydra's wrapper
        build_model(cfg, digits())


def test_a_model_factory_builds_a_new_model_a_call_as_build_model_does():
    # A fused group's members share one factory, each calling it after its own seed.
    cfg, data = OmegaConf.load(CONF / "model" / "mlp.yaml"), digits()
    make = model_factory(cfg, data)
    torch.manual_seed(3)
    first, second = make(), make()
    torch.manual_seed(3)
    alone = build_model(cfg, data)
    assert first is not second and not torch.equal(first[1].weight, second[1].weight)
    for ours, theirs in zip(first.state_dict().values(), alone.state_dict().values(),
                            strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_works_on_digits_mnist_and_cifar_sizes(in_shape):
    net = cnn(in_shape, 10)
    assert net(torch.randn(4, *in_shape)).shape == (4, 10)


def test_image_models_reject_flat_inputs():
    with pytest.raises(ConfigError, match=r"needs images \(C, H, W\).*\(64,\)"):
        cnn((64,), 10)


def test_resnet18_on_32x32_images():
    net = resnet18((3, 32, 32), 10)
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gray = resnet18((1, 32, 32), 7)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 7)
