"""How results are written for people and for scripts.

- `render_table`: one row per result, fixed decimals per column, the device that measured it
  and a short description of the architecture beside its graph hash. A prediction shows its
  interval, never statistics it does not have (it has no runs behind it).
- `write_jsonl`: JSON Lines, one object per result (raw per-run times only when asked), then
  one summary object; `write_csv`: the same rows as CSV.

The CLI writes its results with these, and `harness report` shares the describers, the
shortening and the dates, so a sample or a date reads the same in a table and in the page.
"""
import csv
import re
import json
import math
import time
from dataclasses import asdict
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from harness.store.measurement import Measurement

DESCRIPTION_WIDTH = 48  # characters of the architecture's description in a table

# The flat fields of a row, in the order of a CSV's columns.
ROW_FIELDS = ("index", "device", "runtime", "arch", "graph_hash", "variant", "source", "median_ms",
              "p90_ms", "p99_ms", "iqr_ms", "cv", "n", "interval_low_ms", "interval_high_ms",
              "load_ms", "peak_mb", "ops_sum_ms", "device_s", "hottest_c", "pinned", "stop",
              "flags", "sample")


def describe_sample(space: Any, sample: Any) -> str:
    """The sample's choices in a few characters: the space's own `describe(sample)` where it
    has one, else describe_choices."""
    describe = getattr(space, "describe", None)
    if callable(describe):
        return str(describe(sample))
    if isinstance(sample, Mapping):
        return describe_choices(sample)
    return str(sample)


def describe_choices(sample: Mapping[str, Any]) -> str:
    """A short text of a sample's choices, for any space: labels grouped by their first
    dotted part (shortened to its initial and number), the labels with a further part joined
    into one word per that part, each choice as its last part's initial and its value; so
    'stage1.depth=3, stage1.block0.expand=6, stage1.block0.kernel=5' reads 's1: d3 e6k5'."""
    groups: Dict[str, Dict[str, List[str]]] = {}
    for label in sorted(sample):
        parts = str(label).split(".")
        head = _initial(parts[0]) if len(parts) > 1 else ""
        middle = ".".join(_initial(p) for p in parts[1:-1])
        token = _initial(parts[-1]) + _value(sample[label])
        groups.setdefault(head, {}).setdefault(middle, []).append(token)
    texts = []
    for head, by_middle in groups.items():
        words = ["".join(tokens) if middle else " ".join(tokens)
                 for middle, tokens in sorted(by_middle.items(), key=lambda item: item[0] != "")]
        texts.append((f"{head}: " if head else "") + " ".join(words))
    return " | ".join(texts)


def _initial(part: str) -> str:
    """'stage12' -> 's12', 'kernel' -> 'k', '3' -> '3'."""
    digits = part[len(part.rstrip("0123456789")):]
    letters = part[:len(part) - len(digits)]
    return (letters[:1] + digits) if letters else digits


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "y" if value else "n"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def shortened(text: str, width: int = DESCRIPTION_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def when(stamp: Optional[float]) -> str:
    """A date for people, or 'unknown' when there is none that a clock can show (dates come
    from other machines' clocks and from imported files)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp is not None \
            else "unknown"
    except (OverflowError, OSError, ValueError):
        return "unknown"


def iso_date(stamp: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the second ('2026-12-04T21:45:57Z'), beside the
    epoch seconds in JSON output."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def interval_of(measurement: Measurement) -> Optional[Tuple[float, float]]:
    """The 95% interval of a measured median (of the quiet-state latency, for a measurement
    in interleaved rounds), or a prediction's own interval (None when the predictor gives
    none)."""
    if measurement.source == "predicted":
        return measurement.prediction_interval()
    if measurement.interleaved is not None:
        return measurement.interleaved.quiet_interval_ms
    if measurement.n < 2:
        return None
    low, high = measurement.median_interval()
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def shapes_of(measurement: Measurement) -> str:
    """The input shapes a result was measured at ('1x3x160x160', inputs apart by spaces)."""
    return " ".join("x".join(map(str, item.get("shape", []))) for item in measurement.input_signature
                    if isinstance(item, Mapping))


def variant_name(precision: str, shapes: str, provider: Optional[str] = None) -> str:
    """A variant as the table shows it: the precision, a provider other than the CPU's, and
    the input shapes ('int8-static 1x3x160x160')."""
    parts = [precision]
    if provider and provider != "CPUExecutionProvider":
        parts.append(provider.replace("ExecutionProvider", ""))
    return " ".join(parts + ([shapes] if shapes else []))


def variant_of(measurement: Measurement) -> str:
    """What sets a result apart from others of the same graph in one command: its precision,
    a provider other than the CPU's, and its input shapes ('int8-static 1x3x160x160')."""
    settings = measurement.settings
    return variant_name(str(settings.get("precision") or "fp32"), shapes_of(measurement),
                        str(settings.get("provider") or "CPUExecutionProvider"))


def result_row(index: int, sample: Any, measurement: Measurement, arch: str) -> Dict[str, Any]:
    """The flat fields of one result (ROW_FIELDS). A prediction leaves the statistics of runs
    (p90, p99, IQR, CV, n) empty: it has no runs."""
    m = measurement
    predicted = m.source == "predicted"
    interval = interval_of(m)
    return {
        "index": index, "device": m.device, "runtime": runtime_of(m), "arch": arch,
        "graph_hash": m.graph_hash,
        "source": m.source, "median_ms": m.median,
        "p90_ms": None if predicted else m.p90, "p99_ms": None if predicted else m.p99,
        "iqr_ms": None if predicted else m.iqr, "cv": None if predicted else m.cv,
        "n": None if predicted else m.n,
        "interval_low_ms": interval[0] if interval else None,
        "interval_high_ms": interval[1] if interval else None,
        "load_ms": m.load_ms, "variant": variant_of(m),
        "peak_mb": m.memory.peak_mb if m.memory is not None else None,
        "ops_sum_ms": m.ops.sum_of_medians_ms if m.ops is not None else None,
        "device_s": m.device_s, "hottest_c": m.hottest_c(),
        "pinned": m.pinned_to(), "stop": (m.provenance.stop or {}).get("reason"),
        "flags": list(m.flags), "sample": sample,
    }


def runtime_of(measurement: Measurement) -> str:
    """The runtime that measured a result, as a person reads it: its name and version, and
    its backend where it is not onnxruntime's CPU provider ("litert 2.3.0 xnnpack");
    "-" for a prediction."""
    info = measurement.provenance.runtime or {}
    if not info.get("name"):
        return "-"
    backend = info.get("backend") or info.get("provider")
    backend = None if backend == "CPUExecutionProvider" else backend
    version = str(info.get("version") or "").split("-")[0]
    return " ".join(str(part) for part in (info["name"], version, backend) if part)


def json_row(row: Mapping[str, Any], measurement: Measurement, raw: bool) -> Dict[str, Any]:
    """A row as one JSON Lines object: the flat fields, then how it was taken (settings,
    device identity, agent, provenance) and, with `raw`, every per-run time."""
    data = dict(row)
    data.update(settings=measurement.settings, device_fingerprint=measurement.device_fingerprint,
                agent_version=measurement.agent_version, input_signature=list(
                    measurement.input_signature), created_at=measurement.created_at,
                created=iso_date(measurement.created_at),
                provenance=measurement.provenance.to_dict(),
                memory=None if measurement.memory is None else asdict(measurement.memory),
                ops=None if measurement.ops is None else dict(
                    asdict(measurement.ops), trace=None))  # the trace goes to its own file
    if raw:
        data["samples_ms"] = list(measurement.samples_ms)
    return data


def write_jsonl(stream: IO[str], rows: Sequence[Mapping[str, Any]],
                summary: Mapping[str, Any]) -> None:
    """One compact JSON object per line, then {"summary": ...}."""
    for row in rows:
        stream.write(json.dumps(row, separators=(",", ":"), default=str) + "\n")
    stream.write(json.dumps({"summary": dict(summary)}, separators=(",", ":"), default=str)
                 + "\n")


CSV_DECIMALS = 6  # ms to the nanosecond: no float noise (3.9334065000000002) in a CSV

# What a text from elsewhere (a model's node names, a file's name, an imported device name)
# may not print raw: control characters (ESC clears a screen or sets a window title), and
# the Unicode line and bidirectional-override characters that disguise what is shown.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# A spreadsheet runs a CSV cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def printable(text: Any) -> str:
    """`text` safe for a terminal: every control character shown as its escape (\x1b)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], str(text))


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs: a text starting like a formula gets a leading
    apostrophe (OWASP's advice); numbers pass as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(stream: IO[str], rows: Sequence[Mapping[str, Any]], raw: bool) -> None:
    """The flat fields as CSV (the sample as compact JSON, flags joined by '; ', raw per-run
    times space-separated in a last column with `raw`); a text cell that a spreadsheet would
    run as a formula is neutralised (csv_cell)."""
    fields = list(ROW_FIELDS) + (["samples_ms"] if raw else [])
    writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = dict(row)
        cells["flags"] = "; ".join(row["flags"])
        cells["sample"] = json.dumps(row["sample"], sort_keys=True, separators=(",", ":"))
        if raw:
            cells["samples_ms"] = " ".join(f"{x:.6g}" for x in row["samples_ms"])
        writer.writerow({k: "" if v is None else round(v, CSV_DECIMALS) if isinstance(v, float)
                         else csv_cell(v) for k, v in cells.items()})


def render_table(rows: Sequence[Mapping[str, Any]], statistic: str = "median",
                 statistics: Optional[Sequence[float]] = None,
                 default_variant: Optional[str] = None) -> str:
    """A readable table of result rows: milliseconds with 3 decimals, CV with 1, the chosen
    statistic first (its values in `statistics`, one per row) and never twice. The interval
    is the 95% interval of a measured median, or a prediction's own interval. Thermal and
    pinning columns appear when some device reported them. The variant column appears when
    the rows differ in variant or one is not `default_variant` (a space's fp32 at its own
    input; None: there is no default, as for a model file sized on the command line)."""
    shown = [statistic] + [s for s in ("median", "p90", "p99") if s != statistic]
    values = list(statistics) if statistics is not None else [row["median_ms"] for row in rows]
    thermal = any(row["hottest_c"] is not None for row in rows)
    pinned = any(row["pinned"] for row in rows)
    # the variant column when a command compares variants or measured another than the
    # default; memory and ops when measured
    variants = len({row.get("variant") for row in rows}) > 1 or any(
        row.get("variant") != default_variant for row in rows)
    memory = any(row.get("peak_mb") is not None for row in rows)
    ops = any(row.get("ops_sum_ms") is not None for row in rows)
    # the runtime beside the device, when some result is not onnxruntime's
    runtimes = any(not str(row.get("runtime") or "-").startswith(("onnxruntime", "-"))
                   for row in rows)
    header = ["#", "device"] + (["runtime"] if runtimes else []) + ["architecture", "graph"] + \
        (["variant"] if variants else []) + \
        [f"{s} ms" for s in shown] + ["interval ms", "CV", "n", "load ms"] + \
        (["ops sum ms"] if ops else []) + (["peak MB"] if memory else []) + \
        (["temp C"] if thermal else []) + (["pinned"] if pinned else []) + ["source", "flags"]
    lines = [header]
    for row, value in zip(rows, values):
        predicted = row["source"] == "predicted"
        by_name = {"median": row["median_ms"], "p90": row["p90_ms"], "p99": row["p99_ms"]}
        cells = [str(row["index"]), row["device"]] + ([row["runtime"]] if runtimes else []) + [
                 shortened(row["arch"]),
                 row["graph_hash"][:12] or "-"] + ([row.get("variant") or "-"] if variants else [])
        for name in shown:
            cells.append("-" if predicted and name != "median"
                         else _ms(value if name == statistic else by_name[name]))
        low, high = row["interval_low_ms"], row["interval_high_ms"]
        cells.append(f"{low:.3f}-{high:.3f}" if low is not None and high is not None else "-")
        cells += ["-" if row["cv"] is None else f"{row['cv']:.1%}",
                  "-" if row["n"] is None else str(row["n"]), _ms(row["load_ms"], 1)]
        if ops:
            cells.append(_ms(row.get("ops_sum_ms")))
        if memory:
            cells.append(_ms(row.get("peak_mb"), 1))
        if thermal:
            cells.append("-" if row["hottest_c"] is None else f"{row['hottest_c']:.1f}")
        if pinned:
            cells.append(row["pinned"] or "-")
        flags = "; ".join(row["flags"])
        cells += [row["source"], flags or ("prediction" if predicted else "ok")]
        lines.append([printable(cell) for cell in cells])
    numeric = {c for c, name in enumerate(header)
               if name.endswith("ms") or name in ("CV", "n", "temp C", "#", "peak MB")}
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for r, line in enumerate(lines):
        out.append("  ".join(cell.rjust(w) if c in numeric else cell.ljust(w)
                             for c, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if r == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _ms(value: Optional[float], decimals: int = 3) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def render_ops(measurement: Measurement, top: int) -> str:
    """The per-operator profile of one result for people: the `top` costliest nodes (name,
    op type, provider, median ms, share of the per-node sum), the execution providers that
    ran nodes, and the sum of the per-node medians against the whole-graph median (the gap
    is the runtime's own overhead between operators)."""
    ops = measurement.ops
    if ops is None:
        return "no per-operator profile"
    total = ops.sum_of_medians_ms
    lines = [["node", "op", "provider", "median ms", "share"]]
    for node in ops.top(top):
        share = node.median_ms / total if total > 0 else 0.0
        lines.append([printable(shortened(node.name, 60)), printable(node.op_type),
                      printable(node.provider.replace("ExecutionProvider", "")),
                      f"{node.median_ms:.3f}", f"{share:.1%}"])
    widths = [max(len(line[c]) for line in lines) for c in range(5)]
    out = ["  ".join(cell.rjust(w) if c >= 3 else cell.ljust(w)
                     for c, (cell, w) in enumerate(zip(line, widths))).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    whole = measurement.median
    providers = ", ".join(f"{name.replace('ExecutionProvider', '')} {count}"
                          for name, count in sorted(ops.by_provider().items()))
    out.append(f"{len(ops.nodes)} nodes ({printable(providers)}); sum of per-node medians {total:.3f} ms")
    asked = str(measurement.settings.get("provider") or "CPUExecutionProvider")
    runtime = measurement.settings.get("runtime") or "onnxruntime"
    fell_back = [node for node in ops.nodes  # other runtimes name their kernels, not providers
                 if node.provider != asked and runtime == "onnxruntime"]
    if fell_back:  # the provider asked for could not run these: onnxruntime gave them the CPU
        out.append(f"{len(fell_back)} of {len(ops.nodes)} nodes did not run on {asked} "
                   f"({sum(node.median_ms for node in fell_back):.3f} ms): "
                   + printable(", ".join(sorted({node.op_type for node in fell_back}))))
    profiled = ops.run_median_ms
    if whole > 0 and profiled > 0:
        out.append(f"whole-graph median: {whole:.3f} ms in the timed runs, {profiled:.3f} ms in "
                   f"the {ops.runs} profiled runs; between the operators (runtime overhead): "
                   f"{profiled - total:.3f} ms ({(profiled - total) / profiled:.0%} of a profiled "
                   f"run); profiling itself added {profiled - whole:.3f} ms per run")
    if ops.arena:
        out.append("onnxruntime arena: " + ", ".join(
            f"{key.replace('_bytes', '').replace('_', ' ')} {value / 2**20:.2f} MB"
            for key, value in sorted(ops.arena.items())))
    return "\n".join(out)


def _size(count: int) -> str:
    return f"{count / 2**20:.2f} MB" if count >= 2**20 else f"{count / 1024:.1f} KB"


def render_memory(measurement: Measurement) -> str:
    """The memory figures of one result in a line (MB)."""
    memory = measurement.memory
    if memory is None or memory.baseline_rss_mb is None:
        return "memory: not reported by the device"
    bound = "" if memory.peaks_reset else " (peaks since the agent started: the device " \
        "refused to reset the high-water mark)"
    return (f"memory: {memory.baseline_rss_mb:.1f} MB resident before load, peak "
            f"{memory.load_peak_mb:.1f} MB while loading, {memory.run_peak_mb:.1f} MB over the "
            f"runs (+{memory.added_mb:.1f} MB); model file {_size(memory.model_bytes)}"
            f"{bound}")
