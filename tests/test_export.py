"""ONNX export and the canonical graph hash: equal for equal architectures, different otherwise."""
import onnx
import pytest
import torch
from torch import nn

from harness.errors import ExportError
from harness.export.graph import export_onnx, export_sample, freeze, graph_hash
from harness.spaces.space import random_samples


@pytest.fixture
def sample(tiny):
    return random_samples(tiny, 1, seed=11)[0]


def hash_of(space, sample, shape=(1, 3, 32, 32)):
    return export_sample(space, sample, torch.randn(*shape)).graph_hash


def test_export_is_deterministic(tiny, sample):
    a = export_sample(tiny, sample, tiny.dummy_input())
    b = export_sample(tiny, sample, torch.zeros(1, 3, 32, 32))
    assert a.onnx_bytes == b.onnx_bytes and a.sha256 == b.sha256 and a.graph_hash == b.graph_hash
    onnx.checker.check_model(onnx.load_from_string(a.onnx_bytes))


def test_samples_building_the_same_architecture_hash_the_same(tiny, sample):
    shallow = dict(sample, **{"stage1.depth": 1})
    # Block 1 of stage 1 is not built at depth 1: its labels do not matter.
    other = dict(shallow, **{"stage1.block1.kernel": 7 if shallow["stage1.block1.kernel"] != 7 else 3,
                             "stage1.block1.skip": not shallow["stage1.block1.skip"]})
    assert hash_of(tiny, shallow) == hash_of(tiny, other)


def test_weights_do_not_change_the_hash(tiny, sample):
    module = freeze(tiny, sample)
    first = export_onnx(module, tiny.dummy_input())
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))
    second = export_onnx(module, tiny.dummy_input())
    assert first != second
    assert graph_hash(first) == graph_hash(second)


def test_names_do_not_change_the_hash(tiny, sample):
    model = onnx.load_from_string(export_sample(tiny, sample, tiny.dummy_input()).onnx_bytes)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    mapping = {}

    def rename(name):
        if not name:
            return name
        return mapping.setdefault(name, f"renamed_{len(mapping)}")

    graph = renamed.graph
    for node in graph.node:
        node.name = "n_" + node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for collection in (graph.input, graph.output, graph.value_info):
        for value in collection:
            value.name = rename(value.name)
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    graph.name = "another"
    renamed.producer_name = "someone else"
    onnx.checker.check_model(renamed)
    assert graph_hash(renamed) == graph_hash(model)


def test_kernel_expansion_skip_and_depth_change_the_hash(tiny, sample):
    base = hash_of(tiny, sample)
    for label, value in [("stage2.block0.kernel", 3 if sample["stage2.block0.kernel"] != 3 else 5),
                         ("stage2.block0.expand", 1 if sample["stage2.block0.expand"] != 1 else 3),
                         ("stage2.depth", 1 if sample["stage2.depth"] != 1 else 2)]:
        assert hash_of(tiny, dict(sample, **{label: value})) != base, label
    with_skip = dict(sample, **{"stage1.depth": 2, "stage1.block1.skip": True})
    without = dict(with_skip, **{"stage1.block1.skip": False})
    assert hash_of(tiny, with_skip) != hash_of(tiny, without)


def test_input_shape_changes_the_hash(tiny, sample):
    assert hash_of(tiny, sample) != hash_of(tiny, sample, shape=(1, 3, 64, 64))
    assert hash_of(tiny, sample) != hash_of(tiny, sample, shape=(2, 3, 32, 32))


def test_op_and_attribute_change_the_hash():
    def net(act, pool_kernel=2):
        return nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.MaxPool2d(pool_kernel)).eval()

    x = torch.randn(1, 3, 16, 16)
    relu6 = graph_hash(export_onnx(net(nn.ReLU6()), x))
    assert relu6 != graph_hash(export_onnx(net(nn.ReLU()), x))             # another op
    assert relu6 != graph_hash(export_onnx(net(nn.Hardtanh(0.0, 4.0)), x))  # a Clip bound
    assert relu6 != graph_hash(export_onnx(net(nn.ReLU6(), pool_kernel=3), x))  # an attribute
    model = onnx.load_from_string(export_onnx(net(nn.ReLU6()), x))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    for attribute in conv.attribute:
        if attribute.name == "pads":
            attribute.ints[:] = [1, 1, 1, 1]
    assert graph_hash(model) != relu6


class Broken:
    def search_space(self):
        return {"a": [1]}

    def freeze(self, sample):
        raise RuntimeError("this subnet cannot be built")


class NotExportable(nn.Module):
    def forward(self, x):
        return torch.linalg.eig(x)[0].real  # no ONNX symbolic for eig


def test_broken_models_raise_export_errors(tiny, sample):
    with pytest.raises(ExportError, match="cannot be built"):
        export_sample(Broken(), {"a": 1}, torch.randn(1))
    with pytest.raises(ExportError, match="ONNX export failed"):
        export_onnx(NotExportable(), torch.randn(3, 3))
    with pytest.raises(ExportError, match="dummy input"):
        export_onnx(freeze(tiny, sample), [1, 2, 3])
    with pytest.raises(ExportError, match="readable ONNX"):
        graph_hash(b"not onnx at all")
