"""The `harness` command: parses the arguments (harness.cli.options), runs one command
(harness.cli.measure: profile, filter, calibrate; harness.cli.manage: devices, farm,
report, cache) and prints one line per error with its fix.

    harness profile --space MODULE:ATTR --device NAME --samples N [--seed S]
                    [--json | --csv] [--raw] [--fallback nn-meter [--predictor P] [--offline]]
    harness profile --model FILE.onnx [--input-shape NAME=1x3x224x224 ...] --device NAME
                    [--batch 1,2,4] [--input-size 96,160,224] [--precision fp32,int8-dynamic]
                    [--ops [--top N] [--trace-dir DIR]] [--provider NAME [--provider-option K=V]]
    harness filter --space MODULE:ATTR --device NAME --limit-ms X --samples N [--json]
    harness calibrate --device NAME --space MODULE:ATTR --samples N [--holdout M] [--predictor P]
    harness cache stats | export FILE | import FILE | prune [--device NAME ...] [--limit-mb X]
    harness devices add NAME --ssh USER@HOST[:PORT] [--key FILE] [--jump USER@HOST] [--kind K]
    harness devices add NAME --adb SERIAL | --sim MODEL [--sim-ms MS] [--kind K]
    harness devices list | check NAME | trust NAME [--yes] [--replace] | remove NAME | clean NAME
    harness farm serve [--address HEAD:PORT] [--node-ip IP] | status [--address A] [--json]
                 | stop [--grace S]
"""
import argparse
import logging
import os
import select
import sys
import warnings
from typing import Callable, Dict, Optional, Sequence

from devices.errors import FixableError
from harness.cli.manage import cache_command, devices_command, farm_command, report_command
from harness.cli.measure import calibrate_command, filter_command, profile_command
from harness.cli.options import as_flags, build_parser, check_numbers, option_names

# each subcommand of build_parser() and the function that runs it
COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "profile": profile_command, "calibrate": calibrate_command, "filter": filter_command,
    "devices": devices_command, "farm": farm_command, "report": report_command,
    "cache": cache_command}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `harness` command: runs one command, prints one line per error with its fix (as
    the flags to type), and ends quietly when the reader of its output went away (`| head`)."""
    parser = build_parser()
    try:
        return _run(parser, parser.parse_args(argv))
    except FixableError as exc:
        fix = f"\n  fix: {as_flags(exc.fix, option_names(parser))}" if exc.fix else ""
        print(f"harness: error: {exc.cause()}{fix}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Python would complain again when it flushes stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a program ended by SIGPIPE


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # nn-Meter logs every kernel at INFO on root
        handler.addFilter(lambda record: record.levelno >= logging.WARNING
                          or "nn_meter" not in record.pathname)
    # paramiko logs a traceback of ~40 lines for every connection that fails, beside the one
    # typed error (with its fix) that harness prints: it is for -vv (debugging) only.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if args.verbose >= 2
                                           else logging.CRITICAL + 1)
    if args.verbose < 2:  # nn-Meter's setuptools deprecation notice is not the user's concern
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    try:
        check_numbers(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("harness: interrupted; what was measured is in the cache, so a rerun resumes",
              file=sys.stderr)
        return 130
