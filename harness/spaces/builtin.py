"""Built-in model spaces.

`ProxylessSpace` is a ProxylessNAS / MobileNetV2-style space on 224x224 images: a fixed stem,
then stages of inverted-residual (MBConv) blocks where each block picks its depthwise kernel
(3/5/7) and expansion ratio (3/6), each block after a stage's first picks whether it keeps its
residual skip connection, and each stage picks its depth. `TinySpace` has the same structure
at toy size, for tests and quick trials.

Labels: `stageS.depth`, `stageS.blockB.kernel`, `stageS.blockB.expand`, `stageS.blockB.skip`.
Blocks beyond a stage's depth are not built, so samples that differ only in their labels
build the same architecture (and share one graph hash and one measurement). The spaces are
additive (see harness.spaces.additive): FLOPs, parameters and latency lookup tables are summed per
block.
"""
import functools
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from harness.spaces.additive import AdditiveTerm, Block, chosen_blocks

Stage = Tuple[int, int, int]  # (output channels, max depth, stride of the first block)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1,
             act: bool = True) -> List[nn.Module]:
    layers: List[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, kxk depthwise, 1x1 project, optional skip."""

    def __init__(self, cin: int, cout: int, kernel: int, expand: int, stride: int, skip: bool):
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1, 1)
        layers += _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.skip = skip and stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.skip else out


class MobileSpace:
    """A MobileNetV2-style space; see the module docstring for its labels."""

    def __init__(self, stages: Sequence[Stage], stem_channels: int = 32,
                 first_channels: int = 16, head_channels: int = 1280, num_classes: int = 1000,
                 input_size: int = 224, kernels: Sequence[int] = (3, 5, 7),
                 expands: Sequence[int] = (3, 6), min_depth: int = 2):
        self.stages = [tuple(s) for s in stages]
        self.stem_channels = stem_channels
        self.first_channels = first_channels
        self.head_channels = head_channels
        self.num_classes = num_classes
        self.input_size = input_size
        self.kernels = list(kernels)
        self.expands = list(expands)
        self.min_depth = min_depth

    def config(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items()}

    def dummy_input(self) -> torch.Tensor:
        return torch.randn(1, 3, self.input_size, self.input_size)

    def _depths(self, max_depth: int) -> List[int]:
        return list(range(min(self.min_depth, max_depth), max_depth + 1))

    def search_space(self) -> Dict[str, List[Any]]:
        space: Dict[str, List[Any]] = {}
        for s, (_, max_depth, _) in enumerate(self.stages, 1):
            depths = self._depths(max_depth)
            if len(depths) > 1:
                space[f"stage{s}.depth"] = depths
            for b in range(max_depth):
                space[f"stage{s}.block{b}.kernel"] = list(self.kernels)
                space[f"stage{s}.block{b}.expand"] = list(self.expands)
                if b > 0:
                    space[f"stage{s}.block{b}.skip"] = [True, False]
        return space

    def additive_terms(self, input_shape: Sequence[int]) -> List[AdditiveTerm]:
        """The subnet as a sequence of slots (stem, one per block position, head); see
        harness.spaces.additive. freeze() builds from these very terms."""
        n, _, height, width = input_shape

        def fixed(key: str, build, shape) -> AdditiveTerm:
            return AdditiveTerm((), {(): Block(f"{key}|in{list(shape)}", build, tuple(shape))})

        terms = [fixed("stem", lambda: nn.Sequential(
            *_conv_bn(3, self.stem_channels, 3, 2),
            MBConv(self.stem_channels, self.first_channels, 3, 1, 1, False)),
            (n, 3, height, width))]
        height, width = -(-height // 2), -(-width // 2)
        cin = self.first_channels
        for s, (cout, max_depth, stride) in enumerate(self.stages, 1):
            depth_label = f"stage{s}.depth" if len(self._depths(max_depth)) > 1 else None
            for b in range(max_depth):
                block_stride = stride if b == 0 else 1
                block_cin = cin if b == 0 else cout
                shape = (n, block_cin, height, width)
                labels = ([depth_label] if depth_label else []) + [
                    f"stage{s}.block{b}.kernel", f"stage{s}.block{b}.expand"] + (
                    [f"stage{s}.block{b}.skip"] if b > 0 else [])
                choices = [self._depths(max_depth)] if depth_label else []
                choices += [self.kernels, self.expands] + ([[True, False]] if b > 0 else [])
                blocks: Dict[tuple, Optional[Block]] = {}
                for values in itertools.product(*choices):
                    named = dict(zip(labels, values))
                    if depth_label and named[depth_label] <= b:
                        blocks[values] = None
                        continue
                    kernel = named[f"stage{s}.block{b}.kernel"]
                    expand = named[f"stage{s}.block{b}.expand"]
                    skip = bool(named.get(f"stage{s}.block{b}.skip", False))
                    blocks[values] = Block(
                        f"mbconv|{block_cin}>{cout}|k{kernel}|e{expand}|s{block_stride}|"
                        f"skip{int(skip)}|in{list(shape)}",
                        functools.partial(MBConv, block_cin, cout, kernel, expand,
                                          block_stride, skip), shape)
                terms.append(AdditiveTerm(tuple(labels), blocks))
                if b == 0:
                    height, width = -(-height // stride), -(-width // stride)
            cin = cout
        head_shape = (n, cin, height, width)
        terms.append(fixed("head", lambda: nn.Sequential(
            *_conv_bn(cin, self.head_channels, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(self.head_channels, self.num_classes)), head_shape))
        return terms

    def describe(self, sample: Dict[str, Any]) -> str:
        """The built blocks in a few characters, stages apart: kernel, 'e', expansion, and
        '+' for a residual skip; e.g. '3e3 5e6+|7e6 3e3' is two stages of two blocks."""
        stages = []
        for s, (_, max_depth, _) in enumerate(self.stages, 1):
            depth = sample.get(f"stage{s}.depth", max_depth)
            stages.append(" ".join(
                f"{sample.get(f'stage{s}.block{b}.kernel', '?')}e"
                f"{sample.get(f'stage{s}.block{b}.expand', '?')}"
                f"{'+' if sample.get(f'stage{s}.block{b}.skip') else ''}"
                for b in range(min(int(depth), max_depth))))
        return "|".join(stages)

    def freeze(self, sample: Dict[str, Any]) -> nn.Module:
        terms = self.additive_terms((1, 3, self.input_size, self.input_size))
        return nn.Sequential(*[block.build() for block in chosen_blocks(terms, sample)]).eval()


class ProxylessSpace(MobileSpace):
    """ProxylessNAS (mobile) layout on 224x224 (or `input_size`): six stages, depth 2-4 in
    the first five."""

    def __init__(self, input_size: int = 224) -> None:
        super().__init__(stages=[(24, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2),
                                 (320, 1, 1)], input_size=input_size)


class TinySpace(MobileSpace):
    """A toy space on 32x32 inputs: two stages of up to two blocks, models of a few KB."""

    def __init__(self) -> None:
        super().__init__(stages=[(8, 2, 1), (16, 2, 2)], stem_channels=8, first_channels=8,
                         head_channels=32, num_classes=10, input_size=32, kernels=(3, 5, 7),
                         expands=(1, 3), min_depth=1)


__all__ = ["MobileSpace", "ProxylessSpace", "TinySpace", "MBConv"]
