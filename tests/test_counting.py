"""FLOPs (MACs) and parameter profilers, checked against torch's own counters."""
import logging
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness import random_samples
from harness.metrics.counting import FlopsProfiler, NumParamsProfiler, register_formula, FORMULAS
from harness.spaces import ProxylessSpace, TinySpace


@pytest.mark.parametrize("space", [TinySpace(), ProxylessSpace()], ids=["tiny", "proxyless"])
def test_macs_and_params_match_torch(space):
    flops = FlopsProfiler(space, space.dummy_input())
    params = NumParamsProfiler(space, space.dummy_input())
    assert flops.additive is not None and params.additive is not None
    for sample in random_samples(space, 4, seed=21):
        module = space.freeze(sample)
        with FlopCounterMode(display=False) as counter:
            module(space.dummy_input())
        assert flops.profile(sample) == counter.get_total_flops() / 2
        assert params.profile(sample) == sum(p.numel() for p in module.parameters())
    assert flops.uncounted == set()


def test_batch_and_resolution_follow_the_dummy_input():
    space = TinySpace()
    sample = random_samples(space, 1, seed=2)[0]
    one = FlopsProfiler(space, torch.randn(1, 3, 32, 32)).profile(sample)
    assert FlopsProfiler(space, torch.randn(4, 3, 32, 32)).profile(sample) == 4 * one
    assert FlopsProfiler(space, torch.randn(1, 3, 64, 64)).profile(sample) > 3.5 * one


def test_profile_is_a_table_lookup_not_a_forward_pass():
    space = ProxylessSpace()
    flops = FlopsProfiler(space, space.dummy_input())
    samples = random_samples(space, 200, seed=3)
    started = time.perf_counter()
    values = [flops.profile(s) for s in samples]
    per_call = (time.perf_counter() - started) / len(samples)
    assert len(set(values)) > 100
    # Not a timing goal (see scripts/), a sanity bound: a forward pass takes ~100x longer.
    assert per_call < 0.01


class Spectral(nn.Module):
    """A leaf module harness has no formula for."""

    def forward(self, x):
        return torch.fft.fft2(x).real


class SpectralSpace:
    def search_space(self):
        return {"width": [4, 8]}

    def freeze(self, sample):
        return nn.Sequential(nn.Conv2d(3, sample["width"], 3), Spectral())


def test_modules_without_a_formula_are_reported_not_silently_zero(caplog):
    space = SpectralSpace()
    with caplog.at_level(logging.WARNING, logger="harness"):
        flops = FlopsProfiler(space, torch.randn(1, 3, 8, 8))
        value = flops.profile({"width": 8})
    assert flops.additive is None  # no additive_terms: whole subnets are counted
    assert value == 8 * 3 * 9 * 36
    assert flops.uncounted == {"Spectral"}
    assert "no MAC formula for Spectral" in caplog.text
    register_formula(Spectral, lambda m, args, out: out.numel())
    try:
        assert FlopsProfiler(space, torch.randn(1, 3, 8, 8)).profile({"width": 8}) == \
            8 * 3 * 9 * 36 + 8 * 36
    finally:
        del FORMULAS[Spectral]


class LyingSpace(TinySpace):
    """Claims additivity but freezes a different model."""

    def freeze(self, sample):
        model = super().freeze(sample)
        return nn.Sequential(model, nn.Linear(10, 10))


def test_a_space_that_is_not_additive_as_claimed_is_caught(caplog):
    space = LyingSpace()
    with caplog.at_level(logging.WARNING, logger="harness"):
        flops = FlopsProfiler(space, space.dummy_input())
    assert flops.additive is None and "not additive" in caplog.text
    sample = random_samples(space, 1)[0]
    module = space.freeze(sample)
    with FlopCounterMode(display=False) as counter:
        module(space.dummy_input())
    assert flops.profile(sample) == counter.get_total_flops() / 2


class Functional(nn.Module):
    """Work done by functional calls, not by counted leaf modules."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, 3, 3, 3))
        self.proj = nn.Parameter(torch.randn(10, width))

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.w, padding=1)
        y = torch.nn.functional.interpolate(y, scale_factor=0.5)
        z = y.flatten(2).transpose(1, 2)  # (batch, pixels, width)
        attn = z @ z.transpose(1, 2)  # matmul
        z = attn.softmax(-1) @ z
        return torch.nn.functional.linear(z.mean(1), self.proj)


class FunctionalSpace:
    def search_space(self):
        return {"width": [4, 8]}

    def freeze(self, sample):
        return Functional(sample["width"])


def test_functional_operators_are_counted_like_torch_counts_them():
    space, x = FunctionalSpace(), torch.randn(2, 3, 16, 16)
    flops = FlopsProfiler(space, x)
    for width in (4, 8):
        with FlopCounterMode(display=False) as counter:
            space.freeze({"width": width})(x)
        assert flops.profile({"width": width}) == counter.get_total_flops() / 2 > 0
    assert flops.uncounted == set()  # a leaf whose functional work counted is not "uncounted"
