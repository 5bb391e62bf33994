"""The commands that measure: `harness profile` (a space's subnets or a model file, in a
sweep of precisions, batch and input sizes), `harness filter` (decisions against a limit)
and `harness calibrate`."""
import argparse
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.cli.options import agent_settings, input_shape, numbers, space_with_input
from harness.errors import HarnessError, InvalidArgument

log = logging.getLogger(__name__)

MAX_LISTED_PASSED = 50  # samples below the limit listed by `harness filter` (all in --json)


def sampled(args: argparse.Namespace) -> Tuple[Any, List[Dict[str, Any]]]:
    """The space of --space and --samples samples of it drawn with --seed."""
    from harness.spaces.space import random_samples

    space = space_with_input(args.space)
    if args.samples < 1:
        raise HarnessError("--samples must be at least 1", fix="pass --samples 8, for example")
    return space, random_samples(space, args.samples, seed=args.seed)


@dataclass(frozen=True)
class _Variant:
    """One column of a sweep: a precision at a batch size and an input size (None: as is)."""

    precision: str
    batch: Optional[int]
    size: Optional[int]


def _variants(args: argparse.Namespace) -> List[_Variant]:
    from harness.export.model_file import check_precision

    precisions = list(dict.fromkeys(check_precision(p.strip())
                                    for p in args.precision.split(",")))
    return [_Variant(p, b, z) for b in numbers(args.batch, "--batch")
            for z in numbers(args.input_size, "--input-size") for p in precisions]


def _swept(shape: Sequence[Any], variant: _Variant) -> List[Any]:
    """A shape with the variant's batch (first axis) and size (last two axes of an image)."""
    shape = list(shape)
    if variant.batch is not None and shape:
        shape[0] = variant.batch
    if variant.size is not None and len(shape) == 4:
        shape[2] = shape[3] = variant.size
    return shape


def profile_command(args: argparse.Namespace) -> int:
    from harness.report import output

    if args.raw and not (args.json or args.csv):
        raise HarnessError("--raw adds the raw per-run times to --json or --csv output",
                           fix="pass --json --raw or --csv --raw")
    if args.top < 1:
        raise InvalidArgument(f"--top {args.top} shows no node", fix="pass --top 10, for example")
    started = time.monotonic()
    variants = _variants(args)
    if args.ops:
        _trace_folder(args)  # before measuring: a bad folder must not cost the measurements
    counters: Counter = Counter()  # what the command's profilers counted, added up
    measured, default_variant = (_profile_model if args.model else _profile_space)(
        args, variants, counters)
    measured.sort(key=lambda item: item[0])  # a subnet's variants side by side
    results = [m for _, _, _, m in measured]
    rows = [output.result_row(index, sample, m, arch) for index, sample, arch, m in measured]
    sources = Counter(m.source for m in results)
    flagged = sorted({row["index"] for row in rows if row["flags"]})
    summary = {"samples": len({index for index, _, _, _ in measured}), "results": len(results),
               "architectures": len({m.graph_hash for m in results}),
               "measured": sources["measured"], "cached": sources["cached"],
               "predicted": sources["predicted"], "exported": counters.get("exports", 0),
               "converted": counters.get("conversions", 0),
               "convert_s": round(counters.get("convert_s", 0.0), 3),
               "device": args.device, "elapsed_s": round(time.monotonic() - started, 3),
               "device_s": counters.get("device_s", 0.0),
               "measurements": counters.get("measurements", 0),
               "fixed_loop_s": counters.get("fixed_loop_s", 0.0), "flagged": flagged,
               "input_shapes": list(dict.fromkeys(output.shapes_of(m) for m in results))}
    traces = _write_traces(args, rows, results) if args.ops else []
    if traces:
        summary["traces"] = [str(path) if path else None for path in traces]
    if args.json:
        output.write_jsonl(sys.stdout, [output.json_row(row, m, args.raw)
                                        for row, m in zip(rows, results)], summary)
        return 0
    if args.csv:
        output.write_csv(sys.stdout, [dict(row, samples_ms=m.samples_ms)
                                      for row, m in zip(rows, results)], args.raw)
        return 0
    print(output.render_table(rows, args.statistic,
                              [m.statistic(args.statistic) for m in results], default_variant))
    if args.ops or args.model:
        for row, m, trace in zip(rows, results, traces or [None] * len(results)):
            print(f"\n#{row['index']} {output.printable(row['arch'])} "
                  f"{output.printable(row['variant'])}: {output.render_memory(m)}")
            if args.ops:
                print(output.render_ops(m, args.top))
                print(f"Chrome trace (Perfetto, chrome://tracing): "
                      f"{trace or 'not written (see the warning)'}")
    converted = (f", {summary['converted']} converted for the runtime "
                 f"({summary['convert_s']:.1f} s)" if summary["converted"] else "")
    print(f"\n{summary['samples']} {'model file' if args.model else 'samples'}, "
          f"{summary['results']} results, {summary['architectures']} distinct architectures: "
          f"{summary['measured']} measured, {summary['cached']} from the cache, "
          f"{summary['predicted']} predicted; {summary['exported']} exported{converted}; "
          f"{summary['elapsed_s']:.1f} s on {args.device}; input "
          f"{', '.join(summary['input_shapes']) or '-'}")
    print(f"device time: {summary['device_s']:.1f} s for {summary['measurements']} "
          f"measurements (the fixed loop: about {summary['fixed_loop_s']:.1f} s)")
    if flagged:
        advice = ("measure them again with --refresh --protocol rounds where the device "
                  "runs our agent (with --reference FILE.onnx for inputs other than an image): "
                  "interleaved beside a reference, they hold on a device shared with other work"
                  if args.protocol != "rounds" else "raise --max-time-ms (more rounds) or "
                  "--ref-gap-ms lower with --ref-share higher (references nearer each candidate)")
        print(f"flagged: samples {', '.join(map(str, flagged))} (see flags); {advice}")
    return 0


Measured = List[Tuple[int, Any, str, Any]]  # (sample index, sample, description, Measurement)


def _profiler(args: argparse.Namespace, space: Any, dummy: Any, variant: _Variant) -> Any:
    from harness.profiler import LatencyProfiler

    fallback = "nn-meter" if args.offline and args.fallback == "error" else args.fallback
    settings = agent_settings(args)
    if args.ops:  # per-operator times come from a loop of their own (rounds have none)
        settings.setdefault("protocol", "loop")
    profiler = LatencyProfiler(space, dummy, device=args.device, statistic=args.statistic,
                               settings=settings, cache=args.cache,
                               isolation=args.isolation, timeout_s=args.timeout,
                               refresh=args.refresh, farm=args.farm, fallback=fallback,
                               predictor=args.predictor, offline=args.offline,
                               precision=variant.precision, calibration=args.calibration,
                               reference=args.reference)
    # what the table shows and the advice names: the library's choice where none was given
    args.statistic, args.protocol = profiler.statistic, profiler.settings["protocol"]
    return profiler


def _profile_space(args: argparse.Namespace, variants: List[_Variant],
                   counters: Counter) -> Tuple[Measured, Optional[str]]:
    """Every variant of --samples subnets of --space, one profiler per variant; and the
    space's default variant (fp32 at its dummy_input()'s shapes)."""
    import torch

    from harness.report.output import describe_sample, variant_name

    space, samples = sampled(args)
    if args.input_shape:
        raise InvalidArgument("--input-shape sizes the inputs of --model",
                         fix="for a space, sweep with --batch and --input-size")
    quiet = args.json or args.csv
    measured: Measured = []
    base = space.dummy_input()
    inputs = [base] if isinstance(base, torch.Tensor) else list(base)
    default = variant_name("fp32", " ".join("x".join(map(str, getattr(t, "shape", ())))
                                            for t in inputs))
    for variant in variants:
        dummy = base
        if variant.batch is not None or variant.size is not None:
            if not isinstance(base, torch.Tensor):
                raise InvalidArgument(f"--batch and --input-size sweep one input, and {args.space}'s "
                                 f"dummy_input() gives several",
                                 fix="sweep in Python with LatencyProfiler and your own inputs")
            dummy = torch.randn(*_swept(base.shape, variant))
        with _profiler(args, space, dummy, variant) as profiler:
            results = profiler.measure_many(samples, progress=False if quiet else None,
                                            per_op=args.ops)
            counters.update(profiler.counters)
        measured += [(i, sample, describe_sample(space, sample), m)
                     for i, (sample, m) in enumerate(zip(samples, results))]
    return measured, default


def _profile_model(args: argparse.Namespace, variants: List[_Variant],
                   counters: Counter) -> Tuple[Measured, Optional[str]]:
    """Every variant of the --model file, through one profiler per precision; and its default
    variant (fp32 at its static shapes; None when an axis is dynamic: it has none)."""
    from harness.export.model_file import load_model
    from harness.report.output import variant_name

    if args.samples != 8 or args.seed != 0 or args.fallback != "error" or args.offline:
        raise InvalidArgument("--model measures one model file: --samples, --seed, --fallback and "
                         "--offline are for spaces", fix="drop them, or use --space")
    model = load_model(args.model)
    args.runtime = _runtime_of_model(args.model, args.runtime)
    given = dict(input_shape(text) for text in args.input_shape)
    model.check_names(given)
    name = os.path.basename(args.model)
    measured: Measured = []
    for precision in dict.fromkeys(v.precision for v in variants):
        with _profiler(args, None, None, _Variant(precision, None, None)) as profiler:
            for variant in (v for v in variants if v.precision == precision):
                shapes = {}
                for item in model.inputs:  # an input left with a dynamic axis is named
                    shape = _swept(given.get(item.name, item.dims), variant)
                    if all(isinstance(dim, int) for dim in shape):
                        shapes[item.name] = shape
                result = profiler.measure_model(model, shapes, per_op=args.ops)
                measured.append((0, {"model": name}, name, result))
            counters.update(profiler.counters)
    static = all(isinstance(d, int) for item in model.inputs for d in item.dims)
    default = variant_name("fp32", " ".join("x".join(map(str, item.dims)) for item in model.inputs))
    return measured, default if static else None


def _runtime_of_model(path: str, asked: Optional[str]) -> Optional[str]:
    """The runtime a --model file runs on: the one its extension names (.tflite: litert,
    .pte: executorch), else --runtime's; InvalidArgument when --runtime names another."""
    from harness.export.formats import runtime_of_file

    follows = runtime_of_file(path)
    if follows is None:
        if asked in ("litert", "executorch"):
            raise InvalidArgument(f"--runtime {asked} does not load ONNX ({path})",
                                  fix="pass its .tflite or .pte file, or --runtime onnxruntime "
                                      "or openvino")
        return asked
    if asked is not None and asked != follows:
        raise InvalidArgument(f"{path} is a model for {follows}, not {asked}",
                              fix=f"drop --runtime, or pass --runtime {follows}")
    return follows


def _trace_folder(args: argparse.Namespace) -> Path:
    """--trace-dir, checked before anything is measured: a folder this user can write to."""
    folder = Path(args.trace_dir)
    if not folder.is_dir():
        raise InvalidArgument(f"--trace-dir {folder} is not a folder", fix="create it, or pass another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--trace-dir {folder} is not writable (read-only, or not this "
                         f"user's)", fix="pass a folder you can write to, e.g. --trace-dir /tmp")
    return folder


def _write_traces(args: argparse.Namespace, rows: Sequence[Dict[str, Any]],
                  results: Sequence[Any]) -> List[Optional[Path]]:
    """One Chrome trace per result with a per-operator profile, in --trace-dir, each written
    whole (devices.safe_files: never through a link planted there, never over a folder).
    A trace that cannot be written (a folder at its path, a full disk) is a warning naming
    it, the cause and the fix, and None in its place: the results are shown all the same."""
    from devices.safe_files import replace_text

    folder = _trace_folder(args)
    written: List[Optional[Path]] = []
    for row, m in zip(rows, results):
        if m.ops is None:
            written.append(None)
            continue
        variant = re.sub(r"[^A-Za-z0-9.-]+", "_", row["variant"])
        path = folder / f"trace-{row['index']}-{m.graph_hash[:12]}-{variant}.json"
        try:
            replace_text(path, json.dumps(m.ops.chrome_trace()), mode=0o644, links=True)
        except OSError as exc:
            log.warning("the Chrome trace %s was not written: %s; fix: %s", path,
                        exc.strerror or exc, "move what is at that path aside, free some "
                        "space, or pass another --trace-dir; the results are in the cache")
            written.append(None)
            continue
        written.append(path)
    return written


def filter_command(args: argparse.Namespace) -> int:
    """`harness filter`: which sampled subnets are below a latency limit, at a confidence."""
    from harness.pool.device_pool import MeasureRequest
    from harness.store.decisions import summary
    from harness.profiler import LatencyProfiler

    space, samples = sampled(args)
    started = time.monotonic()
    settings = agent_settings(args)
    # --block-ms is the decisions' (below), not the history's; checked as the setting it was,
    # though a decision uses it in rounds only
    decision_block_ms = settings.pop("block_ms", None)
    if decision_block_ms is not None:
        MeasureRequest.checked({"block_ms": decision_block_ms}, args.timeout)
    if args.window_spread is not None:
        settings["window_spread"] = args.window_spread
    with LatencyProfiler(space, space.dummy_input(), device=args.device,
                         settings=settings, cache=args.cache, timeout_s=args.timeout,
                         farm=args.farm, reference=args.reference) as profiler:
        profiler.decider.use_model = not args.no_model
        if decision_block_ms is not None:
            profiler.decider.block_ms = decision_block_ms
        decisions = profiler.decide_many(samples, args.limit_ms, args.confidence,
                                         indifference=args.indifference)
        model_note, audit = profiler.decider.model_note, profiler.decider.audit.report()
        fixed = profiler.counters.get("fixed_loop_s", 0.0)
    counts = summary(decisions)
    if args.json:
        from harness.report.output import write_jsonl

        write_jsonl(sys.stdout, [dict(d.to_dict(), index=i, sample=s) for i, (s, d) in
                                 enumerate(zip(samples, decisions))],
                    dict(counts, model=model_note, audit=audit, fixed_loop_s=fixed))
        return 0
    by_source = counts["by_source"]
    print(f"{len(decisions)} samples against {args.limit_ms:g} ms at {args.confidence:.1%}: "
          f"{counts['below']} below, {counts['above']} not below, {counts['undecided']} "
          f"undecided (+-{args.indifference:.1%} of the limit is indifferent; the undecided "
          "spent their budget or lie within the device's between-window spread of the limit, "
          "and are listed by their point estimate)")
    print(f"answered by: {by_source['measured']} the device, {by_source['cached']} the cache, "
          f"{by_source['predicted']} the device's latency model")
    print(f"device time: {counts['device_s']:.1f} s (the fixed loop: about {fixed:.1f} s for "
          f"the measured ones alone); {time.monotonic() - started:.1f} s in all on {args.device}")
    print(f"latency model: {model_note}; audit: {audit['audited']} of {audit['skipped']} skips "
          f"measured anyway" + (f", coverage {audit['coverage']:.0%}, agreement "
                                f"{audit['agreement']:.0%}" if audit["audited"] else ""))
    passed = [i for i, d in enumerate(decisions) if d.below]
    shown = ", ".join(map(str, passed[:MAX_LISTED_PASSED]))
    more = f" and {len(passed) - MAX_LISTED_PASSED} more (--json lists all)" \
        if len(passed) > MAX_LISTED_PASSED else ""
    print(f"below {args.limit_ms:g} ms: samples {shown or 'none'}{more} (numbered from 0 in the "
          f"order --seed {args.seed} draws them; --json gives each sample's choices)")
    return 0


def _age(seconds: float) -> str:
    """A duration for people: '40 s', '35 min', '2.5 h', '3 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def calibrate_command(args: argparse.Namespace) -> int:
    from harness.predict.accuracy import render_report
    from harness.campaigns.calibrate import calibrate

    space = space_with_input(args.space)
    result = calibrate(space, space.dummy_input(), args.device, args.samples, args.holdout,
                       space_name=args.space, seed=args.seed, predictor=args.predictor,
                       build_kernels=False if args.no_kernels else None,
                       settings=agent_settings(args), cache=args.cache,
                       progress=False if args.json else None, statistic=args.statistic,
                       fresh=args.fresh, on_progress=None if sys.stderr.isatty() else
                       lambda line: print(line, file=sys.stderr, flush=True))
    calibration = result.calibration
    reused = result.reused or {}
    if args.json:
        print(json.dumps({"folder": str(result.folder), "report": result.report,
                          "kind": calibration.kind, "intercept": calibration.intercept,
                          "slope": calibration.slope, "per_kernel_ms": calibration.per_kernel_ms,
                          "fixed_ms": calibration.fixed_ms,
                          "png": str(result.png) if result.png else None,
                          "activated": result.activated, "warning": result.warning,
                          "reused": reused}, indent=1))
        return 0
    if reused.get("count"):
        print(f"reused {reused['count']:.0f} of {reused['of']:.0f} measurements from the cache, "
              f"taken {_age(reused['newest_s'])} to {_age(reused['oldest_s'])} ago "
              f"(--fresh measures them anew)\n")
    print(f"accuracy on {args.holdout} held-out subnets of {args.space} measured on "
          f"{args.device}:\n")
    print(render_report(result.report))
    print(f"\ncorrection ({calibration.kind}): measured {calibration.statistic} = "
          f"{calibration.correction.formula()}, fitted on {args.samples} subnets")
    if result.activated:
        print(f"stored in {result.folder} (the nn-Meter fallback for {args.device} uses it)")
    else:
        print(f"warning: {result.warning}\nfix: calibrate with more subnets (--samples 100 "
              f"--holdout 20 or more), on an idle device, or with --fresh", file=sys.stderr)
        print(f"stored in {result.folder}, NOT used as {args.device}'s fallback")
    if result.png:
        print(f"scatter: {result.png}")
    return 0
