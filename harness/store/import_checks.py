"""The checks every row of an imported cache export passes before the store trusts it.

`ImportChecker` reads a JSON Lines export and yields only rows whose types, ranges, dates and
keys check out (a key must match the record it carries); the others are counted as
`SkippedRow`s with their reason, and a file that is not a harness export is refused whole.
"""
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple

from agents.ort_agent import AgentError, parse_settings
from devices.agent_result import MAX_SAMPLE_MS
from devices.safe_files import LineTooLong, read_lines
from harness.errors import CacheError
from harness.store.decisions import Decision
from harness.store.key import MeasurementKey, canonical_json, digest, settings_key
from harness.store.measurement import Measurement

SCHEMA_VERSION = 1  # of the cache file, and of its exports
EXPORT_FORMAT = "harness-cache-export"
# An imported date may run ahead of this machine's clock by this much (clock skew between
# hosts); a row dated further ahead is skipped.
MAX_CLOCK_SKEW_S = 3600.0
# Graph hashes and the digests in keys (settings, device) are sha256 hex digests.
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# The longest line an import reads (a measurement with per-operator times is far shorter):
# a longer one refuses the file, so a file of NUL bytes or /dev/zero cannot fill the memory.
MAX_LINE_BYTES = 16 * 2**20


def finite(value: Any) -> Optional[float]:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def is_json_object(text: Any) -> bool:
    """Whether `text` is the JSON text of an object (what a sample key is)."""
    if not isinstance(text, str) or not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _sample_object(text: Any) -> Optional[Dict[str, Any]]:
    """A sample-index key parsed: a JSON object in canonical form (what the profiler writes),
    else None."""
    if not isinstance(text, str):
        return None
    try:
        sample = json.loads(text)
    except ValueError:
        return None
    if not isinstance(sample, dict) or canonical_json(sample) != text:
        return None
    return sample


def sample_labels(text: Any) -> Optional[Tuple[str, ...]]:
    sample = _sample_object(text)
    return tuple(sorted(sample)) if sample is not None else None


@dataclass(frozen=True)
class SkippedRow:
    """A row of an export that was not imported: its line, its type and why."""

    line: int
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} ({self.kind}): {self.reason}"


class ImportCounts(dict):
    """What an import added: new rows by type ({"device": n, "sample": n, "measurement": n}),
    plus `skipped`, the rows of the file that failed their checks (SkippedRow, in file order)."""

    def __init__(self, added: Dict[str, int], skipped: List[SkippedRow]):
        super().__init__(added)
        self.skipped = list(skipped)

    def skipped_by_reason(self) -> Dict[str, int]:
        """How many rows were skipped per reason (the reason's text up to its first colon)."""
        counts: Dict[str, int] = {}
        for row in self.skipped:
            reason = row.reason.split(":")[0]
            counts[reason] = counts.get(reason, 0) + 1
        return counts


class _Skip(Exception):
    """One row fails its checks; the message says why."""


class ImportChecker:
    """Reads an export file and checks every row against what harness itself writes.

    The file as a whole must be UTF-8 JSON Lines with the export header first, else CacheError
    (nothing is imported). Each row then must be a known type with the right field types, and:
    - dates finite numbers, not before 1970 and not more than MAX_CLOCK_SKEW_S ahead of now;
    - a measurement measured (not predicted), with samples_ms a non-empty list of finite
      positive numbers, and a key that matches the record it carries: the same graph hash,
      input signature and agent version, and the device digest recomputed from the record's
      device fingerprint; hashes and digests are sha256 hex;
    - a device row's fingerprint the digest of its identity;
    - a sample-index row's sample a JSON object in canonical form, of the same labels as
      the other rows of its space (in the cache or earlier in the file), and its graph hash
      a sha256 hex.
    Rows that fail are collected in `skipped` and left out."""

    def __init__(self, path: Path, labels_by_space: Optional[Dict[str, Tuple[str, ...]]] = None):
        self.path = path
        self.skipped: List[SkippedRow] = []
        self._labels = dict(labels_by_space or {})
        self._horizon = time.time() + MAX_CLOCK_SKEW_S

    def _refuse(self, problem: str) -> CacheError:
        return CacheError(f"{self.path} is not a harness cache export: {problem}; nothing was "
                          f"imported", fix="import a file written by 'harness cache export' "
                                           "(the cache's .sqlite file itself is not an export)")

    def read(self) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """(type, checked row) for every row that passes, in file order."""
        try:
            handle = open(self.path, "rb")
        except OSError as exc:
            raise CacheError(f"cannot read {self.path}: {exc}", fix="check the path") from exc
        with handle:
            header = True
            for number, raw in self._lines(handle):
                if b"\0" in raw:
                    raise self._refuse(f"line {number} holds NUL bytes (a binary file)")
                try:
                    entry = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise self._refuse(f"line {number} is not UTF-8 text") from None
                except ValueError as exc:
                    raise self._refuse(f"line {number} is not JSON ({exc})") from None
                if header:
                    self._check_header(entry)
                    header = False
                    continue
                kind = entry.get("type") if isinstance(entry, dict) else None
                try:
                    yield self._check(kind, entry)
                except _Skip as exc:
                    self.skipped.append(SkippedRow(number, str(kind or "entry"), str(exc)))
            if header:
                raise self._refuse("the file is empty")

    def _lines(self, handle: BinaryIO) -> Iterator[Tuple[int, bytes]]:
        try:
            yield from read_lines(handle, MAX_LINE_BYTES)
        except LineTooLong as exc:
            raise self._refuse(f"line {exc.line} is longer than {exc.limit // 2**20} MiB "
                               f"(no export row is)") from None

    def _check_header(self, entry: Any) -> None:
        if not isinstance(entry, dict) or entry.get("type") != EXPORT_FORMAT:
            raise self._refuse(f"line 1 is no {EXPORT_FORMAT} header")
        version = entry.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise self._refuse(f"line 1 has no valid format version ({version!r})")
        if version > SCHEMA_VERSION:
            raise CacheError(f"{self.path} was written by a newer harness (format {version}, "
                             f"this one reads {SCHEMA_VERSION}); nothing was imported",
                             fix="upgrade harness, then import it")

    def _check(self, kind: Any, entry: Any) -> Tuple[str, Dict[str, Any]]:
        if kind == "device":
            return kind, self._device(entry)
        if kind == "sample":
            return kind, self._sample(entry)
        if kind == "measurement":
            return kind, self._measurement(entry)
        if kind == "decision":
            return kind, self._decision(entry)
        raise _Skip(f"unknown entry type: {kind!r}")

    # ---------------------------------------------------------------- field checks

    @staticmethod
    def _field(entry: Dict[str, Any], name: str) -> Any:
        if name not in entry:
            raise _Skip(f"missing field: {name}")
        return entry[name]

    def _text(self, entry: Dict[str, Any], name: str) -> str:
        value = self._field(entry, name)
        if not isinstance(value, str) or not value:
            raise _Skip(f"bad {name}: not a non-empty string ({value!r:.80})")
        return value

    def _hex(self, entry: Dict[str, Any], name: str) -> str:
        value = self._text(entry, name)
        if not HEX_DIGEST.fullmatch(value):
            raise _Skip(f"bad {name}: not a sha256 hex digest ({value!r:.80})")
        return value

    def _object(self, entry: Dict[str, Any], name: str) -> Dict[str, Any]:
        value = self._field(entry, name)
        if not isinstance(value, dict):
            raise _Skip(f"bad {name}: not a JSON object ({value!r:.80})")
        return value

    def _date(self, entry: Dict[str, Any], name: str) -> float:
        value = finite(self._field(entry, name))
        if value is None or value < 0:
            raise _Skip(f"bad {name}: not a finite date in seconds since 1970 "
                        f"({entry[name]!r:.80})")
        if value > self._horizon:
            raise _Skip(f"dated in the future: {name} is {value - time.time():.0f} s ahead "
                        f"of this machine's clock")
        return value

    def _optional_duration(self, entry: Dict[str, Any], name: str) -> None:
        value = entry.get(name)
        if value is not None and (finite(value) is None or value < 0):
            raise _Skip(f"bad {name}: not a finite number >= 0 or null ({value!r:.80})")

    # ---------------------------------------------------------------- row types

    def _device(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        fingerprint = self._hex(entry, "fingerprint")
        identity = self._object(entry, "identity")
        if digest(identity) != fingerprint:
            raise _Skip("key mismatch: the fingerprint is not the digest of the identity")
        return {"fingerprint": fingerprint, "identity": identity,
                "first_seen": self._date(entry, "first_seen")}

    def _sample(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        space_fp = self._hex(entry, "space_fp")
        input_sig = self._input_sig(entry)
        text = self._text(entry, "sample")
        labels = sample_labels(text)
        if labels is None:
            raise _Skip(f"bad sample: not a JSON object in canonical form ({text!r:.80})")
        known = self._labels.get(space_fp, labels)
        if labels != known:
            raise _Skip(f"bad sample: its labels {list(labels)[:6]} differ from those of the "
                        f"space's other samples {list(known)[:6]}")
        checked = {"space_fp": space_fp, "input_sig": input_sig, "sample": text,
                   "graph_hash": self._hex(entry, "graph_hash"),
                   "created_at": self._date(entry, "created_at")}
        self._labels[space_fp] = labels
        return checked

    def _input_sig(self, entry: Dict[str, Any]) -> str:
        text = self._text(entry, "input_sig")
        try:
            signature = json.loads(text)
        except ValueError:
            signature = None
        if not isinstance(signature, list) or canonical_json(signature) != text:
            raise _Skip(f"bad input_sig: not a JSON list in canonical form ({text!r:.80})")
        return text

    def _measurement(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        uid = self._text(entry, "uid")
        key = self._key(entry)
        record = self._object(entry, "measurement")
        graph_hash, input_sig, settings_digest, device_fp, agent_version = key.values()

        if record.get("source") != "measured":
            raise _Skip(f"not measured: source is {record.get('source')!r:.40}, only measured "
                        f"results are imported")
        self._samples(record)
        self._text(record, "device")
        if self._hex(record, "graph_hash") != graph_hash:
            raise _Skip("key mismatch: the key's graph hash is not the measurement's")
        signature = self._field(record, "input_signature")
        if not isinstance(signature, list) or canonical_json(signature) != input_sig:
            raise _Skip("key mismatch: the key's input signature is not the measurement's")
        if record.get("agent_version") != agent_version:
            raise _Skip("key mismatch: the key's agent version is not the measurement's")
        if digest(self._object(record, "device_fingerprint")) != device_fp:
            raise _Skip("key mismatch: the key's device digest is not that of the "
                        "measurement's device fingerprint")
        if settings_key(self._settings(record)) != settings_digest:
            raise _Skip("key mismatch: the key's settings digest is not that of the "
                        "measurement's settings")
        if "provenance" in record:
            self._object(record, "provenance")
        for name in ("load_ms", "first_run_ms"):
            self._optional_duration(record, name)
        self._date(record, "created_at")
        try:
            measurement = Measurement.from_dict(record)
        except (TypeError, ValueError, KeyError) as exc:
            raise _Skip(f"bad measurement: {type(exc).__name__}: {exc}") from None
        return {"uid": uid, "measurement": measurement, "key": key}

    def _samples(self, record: Dict[str, Any]) -> List[float]:
        """samples_ms: a non-empty list of finite positive numbers no larger than the agent
        path allows (devices.agent_result.MAX_SAMPLE_MS)."""
        samples = self._field(record, "samples_ms")
        if not isinstance(samples, list) or not samples:
            raise _Skip(f"bad samples_ms: not a non-empty list of numbers ({samples!r:.80})")
        for value in samples:
            number = finite(value)
            if number is None or not 0 < number <= MAX_SAMPLE_MS:
                raise _Skip(f"bad samples_ms: holds {value!r:.40}, not a finite number of "
                            f"milliseconds above 0 and at most {MAX_SAMPLE_MS:g}")
        return samples

    def _settings(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """The record's settings, checked as the agent checks a request's (one validation
        for the command line, the API, the registry and imports)."""
        settings = self._object(record, "settings")
        try:
            return parse_settings(settings)
        except AgentError as exc:
            raise _Skip(f"bad settings: {exc.message}") from None

    def _key(self, entry: Dict[str, Any]) -> MeasurementKey:
        key = self._object(entry, "key")
        unknown = sorted(set(key) - set(MeasurementKey.__dataclass_fields__))
        if unknown:
            raise _Skip(f"bad key: unknown fields {unknown}")
        return MeasurementKey(self._hex(key, "graph_hash"), self._input_sig(key),
                              self._hex(key, "settings_key"), self._hex(key, "device_fp"),
                              self._text(key, "agent_version"))

    def _decision(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        """A stored limit decision with its evidence (the runs behind it)."""
        key = self._key(entry)
        record = self._object(entry, "decision")
        if record.get("source") != "measured":
            raise _Skip(f"not measured: source is {record.get('source')!r:.40}, only measured "
                        f"decisions are imported")
        samples = self._samples(record)
        if record.get("graph_hash") != key.graph_hash:
            raise _Skip("key mismatch: the key's graph hash is not the decision's")
        for name in ("limit_ms", "median_ms", "device_s"):
            value = finite(record.get(name))
            if value is None or value < 0 or value > MAX_SAMPLE_MS:
                raise _Skip(f"bad {name}: not a finite number from 0 to {MAX_SAMPLE_MS:g} "
                            f"({record.get(name)!r:.40})")
        interval = record.get("interval_ms")
        if not isinstance(interval, list) or len(interval) != 2 or \
                any(finite(v) is None for v in interval) or interval[0] > interval[1]:
            raise _Skip(f"bad interval_ms: not two ordered finite numbers ({interval!r:.80})")
        confidence = finite(record.get("confidence"))
        if confidence is None or not 0 < confidence < 1:
            raise _Skip(f"bad confidence: not between 0 and 1 ({record.get('confidence')!r:.40})")
        for share in ("indifference", "window_spread"):  # shares of the limit, of a ratio
            value = finite(record.get(share, 0.0))
            if value is None or not 0 <= value < 0.5:
                raise _Skip(f"bad {share}: not from 0 to 0.5 ({record.get(share)!r:.40})")
        self._date(record, "created_at")
        try:
            decision = Decision.from_dict({k: v for k, v in record.items() if k != "samples_ms"})
        except (TypeError, ValueError, KeyError) as exc:
            raise _Skip(f"bad decision: {type(exc).__name__}: {exc}") from None
        return {"key": key, "record": dict(decision.to_dict(), samples_ms=samples)}
