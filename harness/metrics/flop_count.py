"""Counting one forward pass of a module: FLOPs by torch's operator formulas, in MACs or in
NNI's convention (see harness.metrics.counting for the conventions)."""
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

log = logging.getLogger(__name__)

MacFormula = Callable[[nn.Module, Tuple[torch.Tensor, ...], torch.Tensor], int]
CONVENTIONS = ("macs", "nni")

# User formulas (register_formula): the module is counted by its formula, not its operators.
FORMULAS: Dict[type, MacFormula] = {}

# Zero multiply-accumulates by convention (their cost is memory, not MACs).
ZERO_MAC_MODULES: Tuple[type, ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softmax, nn.Identity, nn.Dropout,
    nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.ELU,
)

_NNI_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.LeakyReLU)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def register_formula(module_type: type, formula: MacFormula) -> None:
    """Count `module_type` with `formula(module, inputs, output) -> MACs`."""
    FORMULAS[module_type] = formula


class OperatorCounter(TorchDispatchMode):
    """Sums torch.utils.flop_counter's FLOPs of every operator run under it (what
    FlopCounterMode counts, without its per-module bookkeeping); `paused` stops counting
    while a module with its own formula owns the operators."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in flop_registry:
            out = func(*args, **kwargs)
            if not self.paused:
                self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
            return out
        return func(*args, **kwargs)


@dataclass
class Counted:
    """One counted forward pass: the count, leaf types without a formula, and the output
    (meta tensors when counted on the meta device)."""

    value: float
    uncounted: Set[str]
    output: Any


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value


def count_forward(module: nn.Module, inputs: Tuple[Any, ...], convention: str = "macs") -> Counted:
    """Count one forward pass of `module` on `inputs` in the given convention (on the meta
    device when the module runs there, else on the CPU)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    module.eval()
    try:
        state = {name: torch.empty_like(t, device="meta") for name, t in
                 [*module.named_parameters(), *module.named_buffers()]}
        return _count(module, _to_meta(inputs), convention,
                      lambda x: torch.func.functional_call(module, state, x))
    except Exception as exc:  # a module that makes CPU tensors of its own, or a meta gap
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
            raise
        log.debug("counting %s on the meta device failed (%s); counting on the CPU",
                  type(module).__name__, exc)
    with torch.no_grad():
        return _count(module, inputs, convention, lambda x: module(*x))


def _count(module: nn.Module, inputs: Tuple[Any, ...], convention: str,
           run: Callable[[Tuple[Any, ...]], Any]) -> Counted:
    counter = OperatorCounter()
    extra = [0.0]
    uncounted: Set[str] = set()
    before: Dict[int, int] = {}
    handles = []

    def pre(leaf: nn.Module, args: Tuple[Any, ...]) -> None:
        before[id(leaf)] = counter.flops
        if type(leaf) in FORMULAS:
            counter.paused += 1

    def post(leaf: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        formula = FORMULAS.get(type(leaf))
        if formula is not None:
            counter.paused -= 1
            extra[0] += 2 * int(formula(leaf, args, output))
        elif counter.flops == before.get(id(leaf)) and not isinstance(leaf, ZERO_MAC_MODULES):
            uncounted.add(type(leaf).__qualname__)
        if convention == "nni":
            extra[0] += 2 * nni_extra(leaf, args, output) * _batch(args)

    for leaf in module.modules():
        if not list(leaf.children()):
            handles.append(leaf.register_forward_pre_hook(pre))
            handles.append(leaf.register_forward_hook(post))
    try:
        with counter:
            output = run(inputs)
    finally:
        for handle in handles:
            handle.remove()
    macs = (counter.flops + extra[0]) / 2
    if convention == "nni":
        macs /= _batch(inputs)
    return Counted(float(macs), uncounted, output)


def _batch(inputs: Tuple[Any, ...]) -> int:
    first = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else 1


def nni_extra(leaf: nn.Module, args: Tuple[Any, ...], output: Any) -> int:
    """What NNI's formulas count beyond the MACs, for one input sample."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if isinstance(leaf, _CONVS) and leaf.bias is not None and isinstance(output, torch.Tensor):
        return int(output.shape[1:].numel())  # cout x output resolution
    if isinstance(leaf, nn.Linear) and leaf.bias is not None and x is not None:
        return int(leaf.out_features * x.shape[1:-1].numel())
    if isinstance(leaf, _BATCHNORMS) and x is not None:
        return int(2 * (1 + bool(leaf.affine)) * x.shape[1:].numel())
    if isinstance(leaf, _NNI_ACTIVATIONS) and x is not None:
        return int(x.shape[1:].numel())
    return 0


def count_macs(module: nn.Module, inputs: Tuple[torch.Tensor, ...],
               convention: str = "macs") -> Tuple[float, Set[str]]:
    """MACs (or NNI-convention FLOPs) of one forward pass, and the names of leaf module
    types that added nothing countable."""
    counted = count_forward(module, inputs, convention)
    return counted.value, counted.uncounted


