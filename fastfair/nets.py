"""Networks for distillation and evaluation: the DC/DM ConvNet family and the
cross-architecture nets of the FairDD paper (AlexNet, VGG11, ResNet18, small ViT).

Every network exposes ``embed(x)`` (flattened features before the classifier,
``embed_dim`` wide) and ``forward(x) = classifier(embed(x))``. Feature sizes are
computed from ``image_size``, never hard-coded, so 28/32/64/128 inputs all work.

The default ConvNet follows the DC/DM code family (Zhao et al. ICLR'21, Zhao &
Bilen WACV'23): depth 3, width 128, 3x3 conv padding 1, "instance norm",
ReLU, AvgPool2d(2), one linear classifier. Instance norm is written as
``nn.GroupNorm(width, width, affine=True)`` on purpose: it normalises each
sample on its own, so per-sample / per-group gradient decompositions through
hooks (``fastfair.pergroup``) stay exact, and the layer types stay standard.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

NORMS = ("instancenorm", "groupnorm", "layernorm", "batchnorm", "none")
POOLINGS = ("avg", "max", "none")
NETWORKS = ("ConvNet", "AlexNet", "VGG11", "ResNet18", "ViT")


def make_norm(norm: str, channels: int) -> nn.Module | None:
    """Normalisation layer for a conv feature map with ``channels`` channels
    (None for ``"none"``)."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "layernorm":
        # Normalises over (C, H, W) per sample, like the DC code's LayerNorm,
        # but with one affine weight per channel so it works at any image size.
        return nn.GroupNorm(1, channels, affine=True)
    if norm == "groupnorm":
        # The DC code family uses 4 groups.
        if channels % 4:
            raise ValueError(f"norm='groupnorm' uses 4 groups and needs a channel count divisible by 4, got {channels}")
        return nn.GroupNorm(4, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if norm == "none":
        return None
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _conv_block(cin: int, cout: int, kernel: int, padding: int, norm: str, stride: int = 1) -> list[nn.Module]:
    # ReLU is not in-place on purpose: module hooks (full backward hooks in
    # fastfair.pergroup) fail or see altered tensors when a layer's output is
    # overwritten in place.
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)]
    n = make_norm(norm, cout)
    if n is not None:
        layers.append(n)
    layers.append(nn.ReLU())
    return layers


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pad_to_32(image_size: int, base_padding: int) -> int:
    """First-conv padding that grows inputs smaller than 32 pixels to 32
    (the DC code does this with padding 3 / 4 for 28x28 MNIST). Needed by the
    5-pool VGG11 and the 3-pool AlexNet: on smaller maps their last layers would
    see 1x1 maps, where instance norm outputs a constant."""
    if image_size >= 32:
        return base_padding
    return base_padding + math.ceil((32 - image_size) / 2)


class _Backbone(nn.Module):
    """features (nn.Sequential ending in Flatten) + classifier (nn.Linear)."""

    features: nn.Sequential
    classifier: nn.Linear

    def __init__(self, features: nn.Sequential, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.embed_dim = embed_dim
        self.classifier = nn.Linear(embed_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class ConvNet(_Backbone):
    """DC/DM ConvNet: ``depth`` x [Conv3x3(pad 1) -> norm -> ReLU -> pool]."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", pooling: str = "avg") -> None:
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = []
        cin, size = channels, image_size
        for _ in range(depth):
            layers += _conv_block(cin, width, 3, 1, norm)
            if pooling == "avg":
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            elif pooling == "max":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            elif pooling != "none":
                raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
            if pooling != "none":
                size //= 2
            if size < 1:
                raise ValueError(f"ConvNet depth {depth} pools a {image_size}px image below 1 pixel; use a smaller depth")
            cin = width
        layers.append(nn.Flatten())
        super().__init__(nn.Sequential(*layers), width * size * size, num_classes)


class AlexNet(_Backbone):
    """AlexNet as in the DC code family (5 convs, 3 max-pools), norm optional."""

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> None:
        pad0 = _pad_to_32(image_size, 2)
        spec = [  # (out, kernel, padding, pool after)
            (128, 5, pad0, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True),
        ]
        layers: list[nn.Module] = []
        cin, size = channels, image_size
        for cout, k, p, pool in spec:
            layers += _conv_block(cin, cout, k, p, norm)
            size = _conv_out(size, k, 1, p)
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            cin = cout
        layers.append(nn.Flatten())
        super().__init__(nn.Sequential(*layers), cin * size * size, num_classes)


class VGG11(_Backbone):
    """VGG11 (configuration A), 3x3 convs with norm, max-pool after blocks."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> None:
        layers: list[nn.Module] = []
        cin, size = channels, image_size
        first = True
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
                continue
            p = _pad_to_32(image_size, 1) if first else 1
            layers += _conv_block(cin, int(v), 3, p, norm)
            size = _conv_out(size, 3, 1, p)
            cin, first = int(v), False
        layers.append(nn.Flatten())
        super().__init__(nn.Sequential(*layers), cin * size * size, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with norm and an identity / 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, cout) or nn.Identity()
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, cout) or nn.Identity()
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            sc: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=False)]
            n = make_norm(norm, cout)
            if n is not None:
                sc.append(n)
            self.shortcut = nn.Sequential(*sc)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(_Backbone):
    """CIFAR-style ResNet18 (3x3 stem, no stem pool), global average pooling."""

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> None:
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)]
        n = make_norm(norm, 64)
        if n is not None:
            layers.append(n)
        layers.append(nn.ReLU())
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), cin, num_classes)


class ViT(nn.Module):
    """Small pre-norm Vision Transformer (FairDD App. Q uses 1 to 3 layers).

    Patch embedding by a strided conv, a learned class token and positional
    embedding, ``depth`` TransformerEncoder layers, final LayerNorm; the
    embedding is the class token's output.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                 patch_size: int | None = None, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ViT needs depth >= 1, got {depth}")
        if width % heads:
            raise ValueError(f"ViT width {width} must be divisible by heads {heads}")
        # About 8x8 tokens whatever the size: 28 -> 4, 32 -> 4, 64 -> 8, 128 -> 16.
        p = patch_size if patch_size is not None else max(1, (image_size + 4) // 8)
        if p < 1 or p > image_size:
            raise ValueError(f"ViT patch_size must be in [1, {image_size}], got {p}")
        grid = image_size // p
        self.patch = nn.Conv2d(channels, width, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=int(width * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.embed_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        h = self.encoder(torch.cat([cls, tokens], dim=1) + self.pos)
        return self.norm(h[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def _build_convnet(c: int, k: int, s: int, width: int, depth: int, norm: str, pooling: str,
                   **kw: Any) -> nn.Module:
    return ConvNet(c, k, s, width=width, depth=depth, norm=norm, pooling=pooling, **kw)


def _build_plain(cls: type) -> Callable[..., nn.Module]:
    # AlexNet / VGG11 / ResNet18 have fixed widths and depths.
    def build(c: int, k: int, s: int, width: int, depth: int, norm: str, pooling: str, **kw: Any) -> nn.Module:
        return cls(c, k, s, norm=norm, **kw)
    return build


def _build_vit(c: int, k: int, s: int, width: int, depth: int, norm: str, pooling: str, **kw: Any) -> nn.Module:
    return ViT(c, k, s, width=width, depth=depth, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "convnet": _build_convnet,
    "alexnet": _build_plain(AlexNet),
    "vgg11": _build_plain(VGG11),
    "resnet18": _build_plain(ResNet18),
    "vit": _build_vit,
}


def get_network(name: str, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                norm: str = "instancenorm", pooling: str = "avg", **kw: Any) -> nn.Module:
    """Build a network by (case-insensitive) name: one of ``NETWORKS``.

    ``width``/``depth``/``pooling`` shape the ConvNet (width and depth also the
    ViT: embedding size and number of layers); AlexNet / VGG11 / ResNet18 have
    their fixed widths. ``norm`` (one of ``NORMS``) applies to every conv net;
    the ViT always uses LayerNorm. Extra keyword arguments go to the ViT
    (``patch_size``, ``heads``, ``mlp_ratio``); any other raises TypeError.
    Parameters are initialised from the global torch RNG: seed it (or fork it)
    for reproducible networks.
    """
    key = str(name).lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown network {name!r}; expected one of {NETWORKS} (case-insensitive)")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    for what, v in (("channels", channels), ("num_classes", num_classes), ("image_size", image_size)):
        if int(v) < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    if key in ("convnet", "vit"):  # the networks whose size the options set
        from .sizes import check_fits

        w, d = int(width), int(depth)
        if w < 1 or d < 1:
            raise ValueError(f"width and depth must be >= 1, got {width}, {depth}")
        # Weights (3x3 convs or transformer blocks ~ 12 w^2 per layer) and the
        # classifier, float32; the activations of one image at full resolution.
        params = d * 12 * w * w + w * num_classes * max(1, (image_size // 2 ** d)) ** 2 + 9 * channels * w
        acts = w * image_size ** 2
        check_fits(4.0 * (params + acts), f"a {name} of width {w}, depth {d} at {image_size}px "
                                          f"({num_classes} classes)")
    try:
        return _BUILDERS[key](int(channels), int(num_classes), int(image_size), int(width), int(depth), norm,
                              pooling, **kw)
    except TypeError as e:
        raise TypeError(f"bad keyword argument for network {name!r}: {e}") from e


def layer_features(net: nn.Module, x: Tensor) -> list[Tensor]:
    """The maps CAFE aligns (fastfair.cafe): the output of every ReLU directly
    in ``net.features`` (a ConvNet's block activations, before pooling), shallow
    to deep, then the embedding ``net.embed(x)``, from ONE forward. Each map is
    flattened to [N, F]."""
    feats = getattr(net, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise ValueError(f"CAFE aligns the layers of a network with a 'features' nn.Sequential (ConvNet, "
                         f"AlexNet, VGG11, ResNet18); {type(net).__name__} has none")
    out: list[Tensor] = []
    h = x
    for m in feats:
        h = m(h)
        if isinstance(m, nn.ReLU):
            out.append(h.flatten(1))
    out.append(h.flatten(1))  # features end in Flatten: the embedding
    return out
