"""Composed export: a subnet of a space with per-block terms is spliced from blocks exported
once each, computes what the whole-model export computes, and hashes like it."""
import hashlib
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from harness import LatencyProfiler
from harness.export.compose import forget_pieces, piece_store
from harness.export.graph import export_onnx, export_sample, freeze, graph_hash
from harness.spaces.space import random_samples
from harness.spaces import ProxylessSpace


@pytest.fixture(autouse=True)
def fresh_memory():
    """Each test starts as a new process would: no pieces in memory."""
    forget_pieces()
    yield
    forget_pieces()


def run(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def whole_model(space, sample, dummy) -> bytes:
    return export_onnx(freeze(space, sample, dummy), dummy)


@pytest.mark.parametrize("space, size", [("tiny", 32), ("proxyless", 32)])
def test_composed_model_computes_what_the_whole_model_does(space, size, tiny):
    space = tiny if space == "tiny" else ProxylessSpace()
    dummy = torch.randn(1, 3, size, size)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for sample in random_samples(space, 2 if space is tiny else 1, seed=5):
        composed = export_sample(space, sample, dummy)
        onnx.checker.check_model(onnx.load_from_string(composed.onnx_bytes))
        whole = whole_model(space, sample, dummy)
        expected = run(whole, x)
        assert np.allclose(run(composed.onnx_bytes, x), expected, rtol=1e-4, atol=1e-5)
        # the hash computed from the pieces is the hash of the bytes, and of the whole model's
        assert graph_hash(composed.onnx_bytes) == composed.graph_hash == graph_hash(whole)
        assert composed.sha256 == hashlib.sha256(composed.onnx_bytes).hexdigest()


def test_freeze_builds_what_the_space_builds(tiny):
    for sample in random_samples(tiny, 3, seed=8):
        assert graph_hash(export_onnx(tiny.freeze(sample).eval(), tiny.dummy_input())) == \
            graph_hash(export_onnx(freeze(tiny, sample), tiny.dummy_input()))


def test_one_architecture_one_hash(tiny):
    sample = dict(random_samples(tiny, 1, seed=11)[0], **{"stage1.depth": 1})
    # block 1 of stage 1 is not built at depth 1: its labels do not matter
    twin = dict(sample, **{"stage1.block1.kernel": 7 if sample["stage1.block1.kernel"] != 7 else 3,
                           "stage1.block1.skip": not sample["stage1.block1.skip"]})
    a, b = export_sample(tiny, sample, tiny.dummy_input()), export_sample(tiny, twin, tiny.dummy_input())
    assert a.graph_hash == b.graph_hash and a.onnx_bytes == b.onnx_bytes
    other = dict(sample, **{"stage2.block0.kernel": 3 if sample["stage2.block0.kernel"] != 3 else 5})
    assert export_sample(tiny, other, tiny.dummy_input()).graph_hash != a.graph_hash


def test_the_hash_does_not_depend_on_what_was_composed_before(tiny, tmp_path):
    samples = random_samples(tiny, 4, seed=12)
    after_others = [export_sample(tiny, s, tiny.dummy_input()) for s in samples][-1]
    forget_pieces()
    alone = export_sample(tiny, samples[-1], tiny.dummy_input(), home=tmp_path / "elsewhere")
    assert alone.graph_hash == after_others.graph_hash and alone.onnx_bytes == after_others.onnx_bytes


def test_pieces_on_disk_serve_another_profiler(tiny, home, tmp_path):
    sample, new = random_samples(tiny, 2, seed=13)
    store = piece_store(home / "pieces")
    with LatencyProfiler(tiny, tiny.dummy_input()) as first:
        graph = first.graph_hash(sample)
    exported = store.counters["exported"]
    assert exported >= 3 and len(list((home / "pieces").glob("*.onnx"))) == exported
    forget_pieces()  # as in a new process
    with LatencyProfiler(tiny, tiny.dummy_input(), cache=tmp_path / "other.sqlite") as second:
        assert second.graph_hash(sample) == graph
        assert second.counters["exports"] == 1
    assert store.counters["exported"] == exported and store.counters["disk"] >= 3
    export_sample(tiny, new, tiny.dummy_input())  # only the blocks not seen yet are exported
    assert store.counters["exported"] == len(list((home / "pieces").glob("*.onnx")))


def test_a_damaged_or_foreign_piece_is_exported_again(tiny, home, tmp_path, caplog):
    sample = random_samples(tiny, 1, seed=14)[0]
    before = export_sample(tiny, sample, tiny.dummy_input())
    store = piece_store(home / "pieces")
    damaged, foreign, linked, donor = sorted((home / "pieces").glob("*.onnx"))[:4]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    foreign.with_suffix(".json").write_text(donor.with_suffix(".json").read_text())
    target = tmp_path / "not-ours.onnx"
    target.write_bytes(linked.read_bytes())
    linked.unlink()
    linked.symlink_to(target)
    forget_pieces()
    caplog.set_level(logging.WARNING, logger="harness.export.compose")
    exported = store.counters["exported"]
    after = export_sample(tiny, sample, tiny.dummy_input())
    assert after.onnx_bytes == before.onnx_bytes and after.graph_hash == before.graph_hash
    assert store.counters["exported"] - exported == 3 and store.counters["rejected"] == 3
    assert sum("damaged or foreign" in r.getMessage() for r in caplog.records) == 3
    for path in (damaged, foreign, linked):  # rebuilt, as regular files matching their records
        record = json.loads(path.with_suffix(".json").read_text())
        assert not path.is_symlink()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert target.read_bytes() != b""  # the link's target was left alone


def test_a_pieces_folder_that_is_a_link_is_not_used(tiny, home, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home.mkdir(parents=True, exist_ok=True)
    (home / "pieces").symlink_to(elsewhere)
    caplog.set_level(logging.WARNING, logger="harness.export.compose")
    exported = export_sample(tiny, random_samples(tiny, 1, seed=15)[0], tiny.dummy_input())
    assert exported.graph_hash and list(elsewhere.iterdir()) == []
    assert any("symbolic link" in r.getMessage() for r in caplog.records)


class PlainSpace:
    """TinySpace without per-block terms: exported whole, as before."""

    def __init__(self, space):
        self.space = space

    def search_space(self):
        return self.space.search_space()

    def freeze(self, sample):
        return self.space.freeze(sample)


def test_a_space_without_terms_is_exported_whole(tiny, home):
    plain = PlainSpace(tiny)
    sample = random_samples(tiny, 1, seed=16)[0]
    exported = export_sample(plain, sample, tiny.dummy_input())
    assert exported.onnx_bytes == export_onnx(freeze(plain, sample), tiny.dummy_input())
    assert not (home / "pieces").exists()
    # same architecture as the composed export: same hash, though not the same weights
    composed = export_sample(tiny, sample, tiny.dummy_input())
    assert composed.graph_hash == exported.graph_hash and composed.sha256 != exported.sha256


def test_blocks_of_two_spaces_never_mix(tiny):
    """Both spaces have a "stem" block at 32 px: the space is part of a piece's key."""
    dummy = torch.randn(1, 3, 32, 32)
    export_sample(tiny, random_samples(tiny, 1, seed=17)[0], dummy)
    proxyless = ProxylessSpace()
    sample = random_samples(proxyless, 1, seed=17)[0]
    assert export_sample(proxyless, sample, dummy).graph_hash == \
        graph_hash(whole_model(proxyless, sample, dummy))


def test_a_space_whose_freeze_differs_from_its_blocks_is_exported_whole(tiny, caplog):
    """Composing trusts a space's terms only after its own freeze() computed the same on a
    few samples: a freeze() that adds a head must be measured with that head."""
    from harness.spaces import TinySpace

    class HeadedSpace(TinySpace):
        def freeze(self, sample):
            return torch.nn.Sequential(super().freeze(sample), torch.nn.Sigmoid())

    space = HeadedSpace()
    sample = random_samples(space, 1, seed=3)[0]
    with caplog.at_level(logging.WARNING, logger="harness"):
        exported = export_sample(space, sample, space.dummy_input())
    assert "exported whole" in caplog.text
    ops = {node.op_type for node in onnx.load_from_string(exported.onnx_bytes).graph.node}
    assert "Sigmoid" in ops
    # the built-in spaces pass the check: their subnets are composed
    from harness.export.graph import composable_terms

    assert composable_terms(space, space.dummy_input()) is None
    assert composable_terms(TinySpace(), space.dummy_input()) is not None
