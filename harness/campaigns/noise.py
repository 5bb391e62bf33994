"""How noisy a device is, measured: its noise level in a few seconds (`noise_level`, what
`harness devices check` prints) and a recording of its speed over minutes
(`record_noise`, `harness devices record-noise`), which simulated devices replay
(devices.noise_trace).

Both time the device's reference model (harness.steps.reference) and two other fixed
subnets of the built-in space (the smallest and the largest choice of every label) in
interleaved rounds, as a measurement in rounds does, and read the reference's blocks.
"""
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Union

import torch

from devices.noise_trace import NoiseTrace, NoiseTraceError, trace_from_blocks
from devices.safe_files import replace_text
from harness.errors import InvalidArgument
from harness.export.graph import ExportedModel, export_sample
from harness.paths import harness_home
from harness.pool.device_pool import MeasureRequest
from harness.pool.pools import open_pool
from harness.spaces.builtin import ProxylessSpace
from harness.steps.reference import reference_model
from harness.store.rounds import block_statistic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseLevel:
    """The reference's spread over a short window of interleaved rounds."""

    cv: float             # of the reference blocks' minima
    drift: float          # median change between neighbouring reference blocks
    blocks: int
    seconds: float

    def __str__(self) -> str:
        return (f"reference blocks vary {self.cv:.1%} (CV), neighbouring ones "
                f"{self.drift:.1%} apart (median), over {self.blocks} blocks in "
                f"{self.seconds:.1f} s")


def _fixed_subnets(input_size: int, home: Path) -> Dict[str, ExportedModel]:
    """The two fixed subnets timed beside the reference: the smallest and the largest."""
    space = ProxylessSpace(input_size=input_size)
    choices = space.search_space()
    dummy = torch.zeros(1, 3, input_size, input_size)
    return {name: export_sample(space, {label: pick(values) for label, values in choices.items()},
                                dummy, home=home)
            for name, pick in (("small", min), ("large", max))}


def _window(device: str, seconds: float, input_size: int,
            home: Union[str, Path, None], block_ms: float) -> Dict[str, list]:
    """The blocks of one window of `seconds` on `device`: {"reference": [...], "small":
    [...], "large": [...]}."""
    home = harness_home(home)
    reference = reference_model(torch.zeros(1, 3, input_size, input_size), home)
    models = _fixed_subnets(input_size, home)
    pool = open_pool(home, device)
    try:
        # rounds warm a model up with no runs besides its cold run and the three probe runs
        # (agent 1.5): on a slow board (an emulated one runs a 96 px subnet in about 2 s)
        # ten warm-up runs of three models took a minute before the window's first block
        request = MeasureRequest.checked(
            {"protocol": "rounds", "rounds": 100000, "block_ms": block_ms,
             "max_time_ms": seconds * 1e3, "min_time_ms": 0.0}, timeout_s=seconds + 300)
        answers = pool.measure_rounds(list(models.values()), reference, request)
    finally:
        pool.close()
    blocks: Dict[str, list] = {}
    for name, model in models.items():
        answer = answers[model.graph_hash]
        if isinstance(answer, Exception):
            raise answer
        if answer.rounds is not None:  # the pool's results of rounds always carry them
            blocks[name] = [list(block) for block in answer.rounds.blocks]
            blocks["reference"] = [list(block) for block in answer.rounds.reference_blocks]
    return blocks


def noise_level(device: str, seconds: float = 5.0, input_size: int = 96,
                home: Union[str, Path, None] = None) -> NoiseLevel:
    """The device's noise level from a window of about `seconds`."""
    reference = _window(device, seconds, input_size, home, block_ms=10.0)["reference"]
    values = [block_statistic(block[3]) for block in sorted(reference, key=lambda b: b[2])]
    mean = statistics.fmean(values)
    steps = [abs(b - a) / ((a + b) / 2) for a, b in zip(values, values[1:])]
    return NoiseLevel(cv=statistics.pstdev(values) / mean if mean else 0.0,
                      drift=statistics.median(steps) if steps else 0.0, blocks=len(values),
                      seconds=seconds)


def record_noise(device: str, minutes: float, out: Union[str, Path], input_size: int = 224,
                 home: Union[str, Path, None] = None) -> NoiseTrace:
    """Record the device's speed for `minutes` into the trace file `out`. Where `out` goes
    is checked before the device spends any time, and a recording that still cannot be
    written there is kept in $HARNESS_HOME/noise-traces/ (the error says where)."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) \
            or not (math.isfinite(minutes) and minutes > 0):
        raise InvalidArgument(f"minutes must be a positive number, got {minutes!r}",
                              fix="pass --minutes 1, for example")
    _check_destination(Path(out))
    blocks = _window(device, minutes * 60.0, input_size, home, block_ms=20.0)
    try:
        trace = trace_from_blocks(device, blocks)
    except NoiseTraceError as exc:  # a recording no trace can stand for: its blocks kept
        kept = _keep(json.dumps(blocks), device, home, "blocks")
        raise NoiseTraceError(exc.message, fix=f"the recorded blocks are kept in {kept}"
                              + (f"; {exc.fix}" if exc.fix else "")) from None
    try:
        trace.save(out)
    except NoiseTraceError as exc:
        kept = _keep(json.dumps(trace.to_dict(), separators=(",", ":")), device, home, "trace")
        raise NoiseTraceError(exc.message, fix=f"the recording is kept in {kept}; copy it "
                              "where you want it") from None
    log.info("recorded %d reference runs over %.0f s of %s into %s",
             len(trace.runs["reference"]), trace.duration_s, device, out)
    return trace


def _keep(text: str, device: str, home: Union[str, Path, None], what: str) -> str:
    """Write a recording that could not go where it was asked into
    $HARNESS_HOME/noise-traces/; where it went (or why it could not be kept either)."""
    kept = harness_home(home) / "noise-traces" / \
        f"{device}-{time.strftime('%Y%m%d-%H%M%S')}-{what}.json"
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        replace_text(kept, text)
    except OSError as exc:
        return f"nowhere: {kept} could not be written either ({exc})"
    return str(kept)


def _check_destination(out: Path) -> None:
    """NoiseTraceError unless `out` can be written: a new or regular file (not a link) in an
    existing, writable folder."""
    folder = out.parent if str(out.parent) else Path(".")
    problem = None
    if not folder.is_dir():
        problem = f"its folder {folder} does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"its folder {folder} is not writable"
    elif out.is_symlink() or (out.exists() and not out.is_file()):
        problem = "it exists and is not a regular file"
    if problem is not None:
        raise NoiseTraceError(f"cannot write the noise trace {out}: {problem}",
                              fix="name a new regular file in a writable folder (--out); "
                                  "nothing was recorded")
