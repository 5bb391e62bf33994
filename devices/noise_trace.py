"""Recorded noise: how fast a real device ran, run by run, over minutes; replayed by simulated
devices so that a protocol's answers can be checked against a truth known exactly.

`harness devices record-noise NAME` times a reference model and two other fixed models on
the device in interleaved rounds for a while and writes every run with its time (this
module's file format, JSON). A simulated device with `noise_trace` in devices.toml replays
it: a run of a graph whose true latency is L, at the device's virtual time t, takes
L x factor_at(t): how much slower than quiet (a low quantile of the reference's runs) the
recorded reference run nearest to t ran (from an offset drawn from the device's seed, the
trace wrapping around). The device's speed is a property of the moment, as on a real device:
models run close in time see the same speed, and speed changes, bursts and per-run jitter
are the recording's, floor included (no replayed run is faster than a recorded one). Drawing
the jitter apart from the moment did neither: on the loaded trace it ran runs 27% below the
quiet level, where no recorded run went, and models run side by side saw unrelated noise,
which no real device shows (pairing with the nearest reference cancels it there). The truth,
L at the quiet level, is known exactly.
"""
import bisect
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from devices.agent_result import finite
from devices.errors import FixableError
from devices.safe_files import replace_text

TRACE_FORMAT = "harness-noise-trace"
TRACE_VERSION = 1
MAX_TRACE_BYTES = 64 * 2 ** 20
MAX_RUNS = 2_000_000
QUIET_QUANTILE = 0.05  # the reference's quiet level: this quantile of its runs
# A recorded run at most this many times slower than the quiet level: this machine's loaded
# trace reaches 3x, a throttled phone about 10x; beyond it a "trace" describes no device,
# and replaying it would only run every window into its timeout.
MAX_SLOWDOWN = 1000.0


class NoiseTraceError(FixableError):
    """A noise trace file that cannot be read or replayed; nothing was simulated."""


class NoiseTrace:
    """The runs of a recording: {model: ((start s, ms), ...)}, the reference's among them."""

    def __init__(self, device: str, runs: Mapping[str, Tuple[Tuple[float, float], ...]],
                 recorded_at: float = 0.0):
        reference = runs.get("reference", ())
        if len(reference) < 2:
            raise NoiseTraceError("a noise trace needs at least two runs of its reference",
                                  fix="record one with 'harness devices record-noise NAME'")
        self.device, self.runs, self.recorded_at = device, dict(runs), recorded_at
        ordered = sorted(ms for _, ms in reference)
        self.quiet_ms = ordered[int(QUIET_QUANTILE * (len(ordered) - 1))]  # its quiet level
        if not self.quiet_ms > 0:  # runs below the clock's resolution read 0 ms
            raise NoiseTraceError("holds a quiet level of 0 ms: its reference's runs are "
                                  "shorter than the device's clock resolves",
                                  fix="record with a larger model (--input-size 224)")
        self._times = [t for t, _ in reference]
        self._factors = [ms / self.quiet_ms for _, ms in reference]
        slowest = max(self._factors)
        if not slowest <= MAX_SLOWDOWN:  # also NaN and inf (a run near 0 ms as the quiet)
            raise NoiseTraceError(
                f"holds a reference run {slowest:.3g} x as slow as its quiet level "
                f"({self.quiet_ms:.3g} ms), more than the {MAX_SLOWDOWN:g} x a device shows",
                fix="record a trace with 'harness devices record-noise NAME --minutes N "
                    "--out FILE'")
        self.duration_s = max(self._times[-1] - self._times[0], 1e-3)

    def _index(self, t: float) -> int:
        """The recorded reference run nearest to time t (s), the trace wrapping around."""
        times = self._times
        t = times[0] + (t % self.duration_s)
        index = min(bisect.bisect_left(times, t), len(times) - 1)
        if index > 0 and t - times[index - 1] < times[index] - t:
            index -= 1
        return index

    def factor_at(self, t: float) -> float:
        """How much slower than quiet the recorded reference run nearest to t ran."""
        return self._factors[self._index(t)]

    def to_dict(self) -> Dict[str, Any]:
        return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "device": self.device,
                "recorded_at": self.recorded_at,
                "runs": {name: [[round(t, 6), round(ms, 6)] for t, ms in runs]
                         for name, runs in self.runs.items()}}

    def save(self, path: Union[str, Path]) -> None:
        """Write the trace to `path` whole (devices.safe_files: a temporary file renamed into
        place; an existing path that is not a regular file is refused)."""
        try:
            replace_text(path, json.dumps(self.to_dict(), separators=(",", ":")))
        except OSError as exc:
            raise NoiseTraceError(f"cannot write the noise trace {path}: {exc}",
                                  fix="name a new regular file in a writable folder") from None

    @classmethod
    def load(cls, path: Union[str, Path]) -> "NoiseTrace":
        """Read and check a trace file; NoiseTraceError names the file and what is wrong."""
        path = Path(path)

        def refuse(problem: str) -> NoiseTraceError:
            return NoiseTraceError(f"noise trace {path} {problem}",
                                   fix="record a trace with 'harness devices record-noise "
                                       "NAME --minutes N --out FILE', or point noise_trace at one")

        try:
            if not path.is_file():
                raise refuse("is not a readable file")
            if path.stat().st_size > MAX_TRACE_BYTES:
                raise refuse(f"is larger than {MAX_TRACE_BYTES // 2 ** 20} MiB")
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise refuse(f"cannot be read as JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
            raise refuse(f"is not a {TRACE_FORMAT} file")
        if data.get("version") != TRACE_VERSION:
            raise refuse(f"has version {data.get('version')!r}; this harness reads "
                         f"{TRACE_VERSION}")
        runs = data.get("runs")
        if not isinstance(runs, dict) or not isinstance(runs.get("reference"), list):
            raise refuse("has no runs of its reference")
        checked: Dict[str, Tuple[Tuple[float, float], ...]] = {}
        total = 0
        for name, series in runs.items():
            if not isinstance(name, str) or not isinstance(series, list):
                raise refuse("holds a series that is not a list of [time s, ms] pairs")
            total += len(series)
            if total > MAX_RUNS:
                raise refuse(f"holds more than {MAX_RUNS} runs")
            checked[name] = _pairs(series, refuse)
        try:
            return cls(str(data.get("device", "")), checked, _finite(data.get("recorded_at")))
        except NoiseTraceError as exc:
            raise refuse(exc.message) from None


def _finite(value: Any) -> float:
    return float(value) if not isinstance(value, bool) and finite(value) else 0.0


def _pairs(series: Sequence[Any], refuse: Any) -> Tuple[Tuple[float, float], ...]:
    pairs = []
    last = -math.inf
    for item in series:
        if not (isinstance(item, list) and len(item) == 2 and all(
                not isinstance(v, bool) and finite(v) for v in item)
                and item[0] >= 0 and 0 < item[1] <= 1e8):
            raise refuse("holds a run that is not [time s >= 0, ms > 0]")
        if item[0] < last:
            raise refuse("holds runs out of time order")
        last = item[0]
        pairs.append((float(item[0]), float(item[1])))
    return tuple(pairs)


def trace_from_blocks(device: str, blocks_by_model: Mapping[str, Sequence[Sequence[Any]]]
                      ) -> NoiseTrace:
    """A trace from interleaved blocks ([round, position, sequence, runs ms, start s]):
    every run timed from its block's start."""
    runs: Dict[str, List[Tuple[float, float]]] = {}
    for name, blocks in blocks_by_model.items():
        series: List[Tuple[float, float]] = []
        for block in blocks:
            at = float(block[4])
            for ms in block[3]:
                series.append((at, float(ms)))
                at += ms / 1e3
        runs[name] = sorted(series)
    return NoiseTrace(device, {name: tuple(series) for name, series in runs.items()},
                      time.time())
