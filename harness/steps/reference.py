"""The reference model a device times beside its candidates in interleaved rounds.

By default a fixed subnet of the built-in ProxylessNAS-style space (the middle choice of
every label) at the candidates' input size, so that it runs the same kinds of kernels as
the candidates and lasts about as long; a user names another model file instead (its
inputs static: a request's input_shapes size the candidates only). Exported once per
profiler. `default_protocol` says where rounds are the default.
"""
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from harness.errors import ExportError, InvalidArgument
from harness.export.formats import FormatTarget
from harness.export.graph import DummyInput, ExportedModel, export_sample, freeze
from harness.export.model_file import Precision, load_model
from harness.spaces.builtin import ProxylessSpace


def default_protocol(settings: Mapping[str, Any], interleaves: bool, dummy_input: DummyInput,
                     reference: Union[str, Path, bytes, None]) -> Dict[str, Any]:
    """The settings with the protocol a profiler measures by, when they name none: "rounds"
    (interleaved beside the reference, which holds on a noisy device) wherever it can run, that
    is on a pool that `interleaves` with a reference for these inputs (the user's, or the
    built-in one for an image input); else "loop", one model at a time."""
    if settings.get("protocol") is not None:
        return dict(settings)
    # the limit rule and per-operator times are the loop's (rounds have neither)
    rounds = interleaves and settings.get("stop") != "limit" and not settings.get("per_op") \
        and (reference is not None or _image_shape(dummy_input) is not None)
    return dict(settings, protocol="rounds" if rounds else "loop")


class Reference:
    """The reference of one profiler, exported when first asked for and kept."""

    def __init__(self, dummy_input: DummyInput, home: Path,
                 reference: Union[str, Path, bytes, None] = None,
                 precision: Optional[Precision] = None):
        if isinstance(reference, (str, Path)) and not Path(reference).is_file():
            # checked whatever the protocol: a reference named and never used (one model at a
            # time) would otherwise pass unnoticed until a profiler of rounds needs it
            raise InvalidArgument(f"the reference model {reference} does not exist or is not "
                                  "a file",
                                  fix="pass the path of an .onnx file (reference=PATH.onnx, "
                                      "--reference PATH.onnx), or none for the built-in one")
        self.dummy_input, self.home, self.file = dummy_input, home, reference
        # the reference runs on the candidates' runtime, at fp32
        self.target = Precision(target=FormatTarget(precision.target.runtime)) \
            if precision is not None else Precision()
        self._exported: Optional[ExportedModel] = None

    def __call__(self) -> ExportedModel:
        if self._exported is None:
            exported = reference_model(self.dummy_input, self.home, self.file)
            if self.target.target.converts:
                exported = self.target.convert(exported, {}, _reference_module(self.dummy_input),
                                               self.dummy_input, self.home)
            self._exported = exported
        return self._exported


def reference_model(dummy_input: DummyInput, home: Path,
                    reference: Union[str, Path, bytes, None] = None) -> ExportedModel:
    """The reference for candidates fed `dummy_input`: the model file `reference`, or the
    built-in space's fixed subnet at the same image size."""
    if reference is not None:
        try:
            loaded = load_model(reference)
            loaded.resolved_shapes(None)  # a reference needs static inputs: refused otherwise
        except ExportError as exc:  # say that it is the reference that is wrong
            raise ExportError(f"the reference model: {exc.message}", fix=exc.fix) from None
        return loaded.exported()
    shape = _image_shape(dummy_input)
    if shape is None:
        raise InvalidArgument("the default reference model takes one image input of shape "
                              "(N, 3, H, H); these candidates take another input",
                              fix="name a reference model of your own: reference=PATH.onnx "
                                  "(harness profile --reference PATH.onnx)")
    space, sample = _reference_sample(shape)
    return export_sample(space, sample, torch.zeros(shape), home=home)


def _reference_sample(shape: tuple) -> Tuple[ProxylessSpace, Dict[str, Any]]:
    space = ProxylessSpace(input_size=shape[2])
    return space, {label: choices[len(choices) // 2]
                   for label, choices in space.search_space().items()}


def _reference_module(dummy_input: DummyInput) -> Callable[[], torch.nn.Module]:
    """The default reference as a module, for a runtime that converts from modules (a user's
    reference file must be in the runtime's format already)."""
    def make() -> torch.nn.Module:
        shape = _image_shape(dummy_input)
        assert shape is not None
        space, sample = _reference_sample(shape)
        return freeze(space, sample, torch.zeros(shape))
    return make


def _image_shape(dummy_input: DummyInput) -> Optional[tuple]:
    if isinstance(dummy_input, (tuple, list)):
        if len(dummy_input) != 1:
            return None
        dummy_input = dummy_input[0]
    if not isinstance(dummy_input, torch.Tensor):
        return None
    shape = tuple(dummy_input.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] < 8:
        return None
    return shape
