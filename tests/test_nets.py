import pytest
import torch
from torch import nn

from fastfair.nets import NETWORKS, NORMS, get_network


@pytest.fixture(autouse=True)
def _one_thread():
    # Small CPU workloads run faster on one thread than on two contended ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("size", [28, 32, 64])
def test_every_network_builds_and_runs(name, size):
    torch.manual_seed(0)
    net = get_network(name, channels=3, num_classes=7, image_size=size)
    x = torch.randn(2, 3, size, size)
    emb = net.embed(x)
    assert emb.shape == (2, net.embed_dim)
    out = net(x)
    assert out.shape == (2, 7)
    # forward is exactly classifier(embed(x))
    torch.testing.assert_close(out, net.classifier(emb))
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("size", [28, 128])
def test_convnet_other_sizes(size):
    net = get_network("convnet", 1, 10, size)
    assert net(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert net.embed_dim == 128 * (size // 8) ** 2


def test_convnet_default_layout():
    net = get_network("ConvNet", 3, 10, 32)
    assert isinstance(net.features, nn.Sequential) and isinstance(net.classifier, nn.Linear)
    assert net.embed_dim == 2048 and net.classifier.in_features == 2048
    types = [type(m) for m in net.features]
    assert types == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3 + [nn.Flatten]
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.out_channels == 128 for c in convs)


@pytest.mark.parametrize("norm,groups", [("instancenorm", 32), ("layernorm", 1), ("groupnorm", 4)])
def test_convnet_groupnorm_variants(norm, groups):
    net = get_network("ConvNet", 3, 10, 32, width=32, depth=2, norm=norm)
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 2
    assert all(m.num_groups == groups and m.num_channels == 32 and m.affine for m in gns)


def test_convnet_instancenorm_is_per_sample():
    # Instance norm must not couple samples: a sample's output is the same alone or in a batch.
    torch.manual_seed(0)
    net = get_network("ConvNet", 3, 5, 16, width=16)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(net(x)[1:2], net(x[1:2]))


def test_convnet_batchnorm_and_none_and_pooling():
    net = get_network("ConvNet", 3, 10, 32, norm="batchnorm", pooling="max")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    net = get_network("ConvNet", 3, 10, 16, width=8, norm="none", pooling="none")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.AvgPool2d)) for m in net.modules())
    assert net.embed_dim == 8 * 16 * 16
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", ["AlexNet", "VGG11", "ResNet18"])
def test_norm_variants_of_other_nets(name):
    net = get_network(name, 3, 10, 32, norm="batchnorm")
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
    net = get_network(name, 3, 10, 32)
    gns = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == m.num_channels for m in gns)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_vit_depth(depth):
    net = get_network("vit", 3, 4, 32, width=32, depth=depth)
    assert len(net.encoder.layers) == depth
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_errors():
    with pytest.raises(ValueError, match="ConvNet"):
        get_network("LeNet9", 3, 10, 32)
    with pytest.raises(ValueError, match="instancenorm"):
        get_network("ConvNet", 3, 10, 32, norm="weirdnorm")
    with pytest.raises(ValueError, match="avg"):
        get_network("ConvNet", 3, 10, 32, pooling="median")
    with pytest.raises(ValueError):
        get_network("ConvNet", 3, 10, 4, depth=3)  # pools below one pixel
    with pytest.raises(TypeError):
        get_network("ConvNet", 3, 10, 32, patch_size=4)
    assert set(NORMS) == {"instancenorm", "groupnorm", "layernorm", "batchnorm", "none"}


def test_convnet_full_backward_hooks_work():
    # Per-sample gradient code hooks every layer; in-place ops on hooked outputs would break it.
    net = get_network("ConvNet", 3, 4, 16, width=8, norm="none")
    seen = []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_full_backward_hook(lambda mod, gi, go: seen.append(go[0].shape))
    net(torch.randn(2, 3, 16, 16, requires_grad=True)).sum().backward()
    assert len(seen) == 4
