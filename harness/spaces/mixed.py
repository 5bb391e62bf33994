"""`MixedSpace`: a small space of the blocks recent mobile models use, beyond MobileNetV2's.

Each block picks its kind (an inverted-residual MBConv, a ResNet bottleneck, or a
ShuffleNetV2 unit that splits channels and concatenates them back), its activation (ReLU,
GELU, hard-swish, SiLU), whether it has a squeeze-excitation gate, and whether it keeps its
residual skip; the head picks whether it upsamples (a Resize) before a small multi-head
self-attention block over the feature map's positions (or no attention at all).

It exists so that latency prediction is exercised on what users export today: in opset 17,
GELU is Div / Erf / Add / Mul with scalar constants, squeeze-excitation multiplies an image
by a broadcast (N, C, 1, 1) gate, attention is MatMul / Softmax / Transpose / Reshape on 3-D
and 4-D tensors, a layer norm is a LayerNormalization or ReduceMean chain. Models are a few
KB to a few hundred KB on 32x32 inputs.

Labels: `blockB.kind`, `blockB.act`, `blockB.se`, `blockB.skip` (B = 0..3), `head.resize`,
`head.heads` (0 = no attention).
"""
from typing import Any, Dict, List

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "hswish": nn.Hardswish, "silu": nn.SiLU}


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(fc(relu(fc(mean(x))))), with 1x1 convolutions as MobileNetV3 does."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(4, channels // 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1),
                                  nn.ReLU(), nn.Conv2d(hidden, channels, 1), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """One block of the space; see the module docstring."""

    def __init__(self, kind: str, cin: int, cout: int, stride: int, act: str, se: bool,
                 skip: bool):
        super().__init__()
        activation = ACTIVATIONS[act]
        self.kind = kind
        self.skip = skip and stride == 1 and cin == cout and kind != "shuffle"
        if kind == "mbconv":
            hidden = cin * 4
            layers = _conv(cin, hidden, 1) + [activation()] + _conv(
                hidden, hidden, 3, stride, hidden) + [activation()]
            layers += ([SqueezeExcite(hidden)] if se else []) + _conv(hidden, cout, 1)
        elif kind == "bottleneck":
            hidden = max(4, cout // 2)
            layers = _conv(cin, hidden, 1) + [activation()] + _conv(hidden, hidden, 3, stride) + [
                activation()] + ([SqueezeExcite(hidden)] if se else []) + _conv(hidden, cout, 1)
        elif kind == "shuffle":  # ShuffleNetV2 unit: half the channels go through a branch
            if cin != cout or stride != 1:
                raise ValueError("a shuffle unit keeps shape")
            half = cin // 2
            layers = _conv(half, half, 1) + [activation()] + _conv(half, half, 3, 1, half) + (
                [SqueezeExcite(half)] if se else []) + _conv(half, half, 1) + [activation()]
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        self.body = nn.Sequential(*layers)
        self.out_act = activation() if kind == "bottleneck" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "shuffle":
            kept, through = torch.split(x, x.shape[1] // 2, dim=1)
            out = torch.cat([kept, self.body(through)], dim=1)
            n, c, h, w = out.shape  # channel shuffle of two groups
            return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        out = self.body(x)
        return self.out_act(x + out if self.skip else out)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (N, L, C) tokens, written out (torch's own module takes a
    fused path in eval mode that the ONNX exporter does not know)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length, c = tokens.shape
        qkv = self.qkv(tokens).reshape(n, length, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, c))


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over the positions of an (N, C, H, W) map, with a
    residual: LayerNorm, SelfAttention (MatMul, Softmax), then a GELU MLP."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = SelfAttention(channels, heads)
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 2 * channels),
                                 nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm(tokens)
        tokens = tokens + self.attention(normed)
        tokens = tokens + self.mlp(tokens)
        return tokens.transpose(1, 2).reshape(n, c, h, w)


class MixedSpace:
    """Four blocks (16 -> 16 -> 32 (stride 2) -> 32 -> 32 channels) and a head; see the module
    docstring for the labels."""

    BLOCKS = [(16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 32, 1)]

    def __init__(self, input_size: int = 32, num_classes: int = 10):
        self.input_size = input_size
        self.num_classes = num_classes

    def dummy_input(self) -> torch.Tensor:
        return torch.randn(1, 3, self.input_size, self.input_size)

    def search_space(self) -> Dict[str, List[Any]]:
        space: Dict[str, List[Any]] = {}
        for b, (cin, cout, stride) in enumerate(self.BLOCKS):
            kinds = ["mbconv", "bottleneck"] + (["shuffle"] if cin == cout and stride == 1 else [])
            space[f"block{b}.kind"] = kinds
            space[f"block{b}.act"] = list(ACTIVATIONS)
            space[f"block{b}.se"] = [False, True]
            space[f"block{b}.skip"] = [False, True]
        space["head.resize"] = [False, True]
        space["head.heads"] = [0, 2, 4]
        return space

    def freeze(self, sample: Dict[str, Any]) -> nn.Module:
        layers: List[nn.Module] = _conv(3, 16, 3, 2) + [nn.Hardswish()]
        for b, (cin, cout, stride) in enumerate(self.BLOCKS):
            layers.append(Block(sample[f"block{b}.kind"], cin, cout, stride,
                                sample[f"block{b}.act"], bool(sample[f"block{b}.se"]),
                                bool(sample[f"block{b}.skip"])))
        channels = self.BLOCKS[-1][1]
        if sample["head.resize"]:
            layers += [nn.Upsample(scale_factor=2, mode="nearest")] + _conv(
                channels, channels, 3, 2, channels)
        if sample["head.heads"]:
            layers.append(Attention(channels, int(sample["head.heads"])))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, self.num_classes)]
        return nn.Sequential(*layers).eval()


__all__ = ["MixedSpace"]
