"""The SQLite store of measurements and of the sample index.

Two maps live in one file:
- the sample index: (space fingerprint, input signature, sample) -> graph hash, so a cached
  `profile()` needs neither a freeze nor an export;
- measurements: (graph hash, input signature, runtime settings, device fingerprint, agent
  version) -> every Measurement taken under that key, raw samples included (the newest
  answers a lookup; older ones are kept, never overwritten).

The file is in WAL mode with a busy timeout, and every write is one IMMEDIATE transaction, so
several processes can profile into one cache at once. Only measured results are stored:
a failure never becomes a row, and a prediction is refused. A file that is not a harness
cache (corrupt, or another program's database) raises CacheError and is never written to.
"""
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from harness.errors import CacheError
from harness.measurement import STATISTICS, Measurement

APPLICATION_ID = 0x484E5331  # "HNS1" in the SQLite header marks a harness cache
SCHEMA_VERSION = 1
EXPORT_FORMAT = "harness-cache-export"
SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE samples (
    space_fp   TEXT NOT NULL,
    input_sig  TEXT NOT NULL,
    sample     TEXT NOT NULL,
    graph_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (space_fp, input_sig, sample)
) WITHOUT ROWID;
CREATE TABLE devices (
    fingerprint TEXT PRIMARY KEY,
    identity    TEXT NOT NULL,
    first_seen  REAL NOT NULL
);
CREATE TABLE measurements (
    uid           TEXT PRIMARY KEY,
    graph_hash    TEXT NOT NULL,
    input_sig     TEXT NOT NULL,
    settings_key  TEXT NOT NULL,
    device_fp     TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    device        TEXT NOT NULL,
    median REAL NOT NULL, mean REAL NOT NULL, p90 REAL NOT NULL, p99 REAL NOT NULL,
    min REAL NOT NULL, max REAL NOT NULL,
    record        TEXT NOT NULL,
    created_at    REAL NOT NULL
);
CREATE INDEX measurements_by_key
    ON measurements (graph_hash, input_sig, settings_key, device_fp, agent_version, created_at);
"""

_KEY_WHERE = ("graph_hash = ? AND input_sig = ? AND settings_key = ? AND device_fp = ? "
              "AND agent_version = ?")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclass(frozen=True)
class MeasurementKey:
    """What makes two measurements interchangeable."""

    graph_hash: str
    input_sig: str       # canonical JSON of the input shapes and dtypes
    settings_key: str    # digest of the runtime and its settings
    device_fp: str       # digest of the device identity (hardware, OS, runtime versions)
    agent_version: str

    def values(self) -> tuple:
        return (self.graph_hash, self.input_sig, self.settings_key, self.device_fp,
                self.agent_version)

    def to_dict(self) -> Dict[str, str]:
        return dict(zip(("graph_hash", "input_sig", "settings_key", "device_fp",
                         "agent_version"), self.values()))


class Cache:
    """A harness cache file; see the module docstring."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._check_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard("open"):
            self._conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA busy_timeout = 60000")
            self._prepare()

    # ------------------------------------------------------------ opening safely

    def _check_file(self) -> None:
        if self.path.is_dir():
            raise CacheError(f"cache path {self.path} is a folder",
                             fix="point the cache at a file path, e.g. ~/.harness/cache.sqlite")
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as handle:
                head = handle.read(len(SQLITE_MAGIC))
            if head != SQLITE_MAGIC:
                raise CacheError(f"{self.path} is not a SQLite database (it starts with "
                                 f"{head[:16]!r}); harness left it untouched",
                                 fix=f"move {self.path} aside (and restore a backup from "
                                     f"'harness cache export'), or use another cache path")

    def _prepare(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            if app_id == 0 and not tables:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID:
                raise CacheError(
                    f"{self.path} is a SQLite database of another program (application_id "
                    f"{app_id:#x}, tables: {', '.join(tables) or 'none'}); harness left it "
                    f"untouched", fix="use another cache path, or move that file aside")
            else:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise CacheError(f"{self.path} was written by a newer harness (schema "
                                     f"{version}, this one reads {SCHEMA_VERSION})",
                                     fix="upgrade harness, or use another cache path")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn SQLite's low-level errors into a CacheError that names the file and the fix."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "malformed" in text or "not a database" in text or "corrupt" in text:
                raise CacheError(f"cache {self.path} is corrupt ({text}) while trying to "
                                 f"{what}; harness left it untouched",
                                 fix=f"move {self.path} aside and start a new cache, or try "
                                     f"'sqlite3 {self.path} .recover' to save its rows") from exc
            raise CacheError(f"cache {self.path} failed to {what}: {text}",
                             fix="check the file's permissions and free disk space") from exc

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._guard(what):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, what: str, sql: str, args: tuple = ()) -> List[tuple]:
        with self._lock, self._guard(what):
            return self._conn.execute(sql, args).fetchall()

    # ------------------------------------------------------------ sample index

    def lookup_sample(self, space_fp: str, input_sig: str, sample_key: str) -> Optional[str]:
        """The graph hash recorded for a sample, or None."""
        rows = self._query("read the sample index",
                           "SELECT graph_hash FROM samples WHERE space_fp = ? AND input_sig = ? "
                           "AND sample = ?", (space_fp, input_sig, sample_key))
        return rows[0][0] if rows else None

    def put_sample(self, space_fp: str, input_sig: str, sample_key: str, graph_hash: str) -> None:
        with self._write("record a sample") as conn:
            conn.execute("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?)",
                         (space_fp, input_sig, sample_key, graph_hash, time.time()))

    # ------------------------------------------------------------ devices

    def put_device(self, device_fp: str, identity: Dict[str, Any]) -> None:
        with self._write("record a device") as conn:
            conn.execute("INSERT OR IGNORE INTO devices VALUES (?, ?, ?)",
                         (device_fp, canonical_json(identity), time.time()))

    # ------------------------------------------------------------ measurements

    def statistics_by_sample(self, space_fp: str, input_sig: str, settings_key: str,
                             device_fp: str, agent_version: str, statistic: str,
                             sample: Optional[str] = None) -> Dict[str, float]:
        """{sample key: statistic of its newest measurement} for every indexed sample of a
        space (or just `sample`) that has a measurement under these settings, device and
        agent: one query that lets a profiler answer a whole resumed sweep from memory."""
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        one = "AND s.sample = ? " if sample is not None else ""
        rows = self._query(
            "read measurements",
            f"SELECT s.sample, m.{statistic} FROM samples s JOIN measurements m "
            "ON m.graph_hash = s.graph_hash AND m.input_sig = s.input_sig "
            f"WHERE s.space_fp = ? AND s.input_sig = ? {one}AND m.settings_key = ? "
            "AND m.device_fp = ? AND m.agent_version = ? ORDER BY m.created_at",
            (space_fp, input_sig, *((sample,) if sample is not None else ()), settings_key,
             device_fp, agent_version))
        return dict(rows)  # newest last, so newest wins

    def get(self, key: MeasurementKey) -> Optional[Measurement]:
        """The newest measurement under `key`, as source="cached", or None."""
        rows = self._query("read a measurement",
                           f"SELECT record FROM measurements WHERE {_KEY_WHERE} "
                           "ORDER BY created_at DESC LIMIT 1", key.values())
        if not rows:
            return None
        return self._decode(rows[0][0]).with_source("cached")

    def history(self, key: MeasurementKey) -> List[Measurement]:
        """Every measurement under `key`, oldest first."""
        rows = self._query("read measurements",
                           f"SELECT record FROM measurements WHERE {_KEY_WHERE} "
                           "ORDER BY created_at", key.values())
        return [self._decode(r[0]).with_source("cached") for r in rows]

    def _decode(self, record: str) -> Measurement:
        try:
            return Measurement.from_dict(json.loads(record))
        except (ValueError, TypeError) as exc:
            raise CacheError(f"cache {self.path} holds an unreadable measurement ({exc})",
                             fix="export what can be read with 'harness cache export', then "
                                 "start a new cache") from exc

    def put(self, key: MeasurementKey, measurement: Measurement) -> None:
        """Store a measured result. Predictions and cached copies are refused."""
        if measurement.source != "measured":
            raise ValueError(f"only measured results are stored, not {measurement.source!r} ones")
        with self._write("store a measurement") as conn:
            self._insert(conn, uuid.uuid4().hex, key, measurement)

    @staticmethod
    def _insert(conn: sqlite3.Connection, uid: str, key: MeasurementKey,
                measurement: Measurement) -> int:
        record = measurement.to_dict()
        for derived in ("stats", "flags"):
            record.pop(derived)
        cursor = conn.execute(
            "INSERT OR IGNORE INTO measurements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (uid, *key.values(), measurement.device, measurement.median, measurement.mean,
             measurement.p90, measurement.p99, measurement.min, measurement.max,
             canonical_json(record), measurement.created_at))
        return cursor.rowcount

    # ------------------------------------------------------------ reports, export, import

    def stats(self) -> Dict[str, Any]:
        """Counts for `harness cache stats`."""
        def count(table: str) -> int:
            return self._query("count rows", f"SELECT COUNT(*) FROM {table}")[0][0]

        per_device = self._query("count measurements",
                                 "SELECT device, COUNT(*), COUNT(DISTINCT graph_hash), "
                                 "MAX(created_at) FROM measurements GROUP BY device ORDER BY device")
        keys = self._query("count keys", "SELECT COUNT(*) FROM (SELECT DISTINCT graph_hash, "
                           "input_sig, settings_key, device_fp, agent_version FROM measurements)")
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
            "schema_version": SCHEMA_VERSION,
            "measurements": count("measurements"),
            "distinct_keys": keys[0][0],
            "samples_indexed": count("samples"),
            "devices": count("devices"),
            "per_device": [{"device": d, "measurements": n, "graphs": g, "latest": t}
                           for d, n, g, t in per_device],
        }

    def export_jsonl(self, path: Union[str, Path]) -> Dict[str, int]:
        """Write every row as JSON Lines (a header line first); returns counts per type."""
        counts = {"device": 0, "sample": 0, "measurement": 0}
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        with self._lock, self._guard("export"), open(partial, "w") as out:
            out.write(canonical_json({"type": EXPORT_FORMAT, "version": SCHEMA_VERSION}) + "\n")
            for fp, identity, first_seen in self._conn.execute("SELECT * FROM devices"):
                out.write(canonical_json({"type": "device", "fingerprint": fp,
                                          "identity": json.loads(identity),
                                          "first_seen": first_seen}) + "\n")
                counts["device"] += 1
            for space_fp, input_sig, sample, graph_hash, created in self._conn.execute(
                    "SELECT * FROM samples"):
                out.write(canonical_json({"type": "sample", "space_fp": space_fp,
                                          "input_sig": input_sig, "sample": sample,
                                          "graph_hash": graph_hash, "created_at": created}) + "\n")
                counts["sample"] += 1
            for row in self._conn.execute(
                    "SELECT uid, graph_hash, input_sig, settings_key, device_fp, agent_version, "
                    "record FROM measurements ORDER BY created_at"):
                key = MeasurementKey(*row[1:6])
                out.write(canonical_json({"type": "measurement", "uid": row[0],
                                          "key": key.to_dict(),
                                          "measurement": json.loads(row[6])}) + "\n")
                counts["measurement"] += 1
        partial.replace(target)
        return counts

    def import_jsonl(self, path: Union[str, Path]) -> Dict[str, int]:
        """Read an export; every line is checked before anything is written, then all rows go
        in one transaction. Rows already present are skipped. Returns counts of new rows."""
        entries = list(_read_export(Path(path)))
        added = {"device": 0, "sample": 0, "measurement": 0}
        with self._write("import") as conn:
            for kind, entry in entries:
                if kind == "device":
                    cursor = conn.execute("INSERT OR IGNORE INTO devices VALUES (?, ?, ?)",
                                          (entry["fingerprint"], canonical_json(entry["identity"]),
                                           entry["first_seen"]))
                    added[kind] += cursor.rowcount
                elif kind == "sample":
                    cursor = conn.execute("INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?)",
                                          (entry["space_fp"], entry["input_sig"], entry["sample"],
                                           entry["graph_hash"], entry["created_at"]))
                    added[kind] += cursor.rowcount
                else:
                    added[kind] += self._insert(conn, entry["uid"], entry["key"],
                                                entry["measurement"])
        return added

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_export(path: Path) -> Iterator[tuple]:
    """Parse and check an export file line by line; errors name the line and the problem."""
    def bad(number: int, problem: str) -> CacheError:
        return CacheError(f"{path}, line {number}: {problem}; nothing was imported",
                          fix="import a file written by 'harness cache export'")

    try:
        handle = open(path)
    except OSError as exc:
        raise CacheError(f"cannot read {path}: {exc}", fix="check the path") from exc
    with handle:
        for number, line in enumerate(handle, 1):
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise bad(number, f"not JSON ({exc})") from None
            if number == 1:
                if not isinstance(entry, dict) or entry.get("type") != EXPORT_FORMAT:
                    raise bad(1, f"no {EXPORT_FORMAT} header")
                if entry.get("version", 0) > SCHEMA_VERSION:
                    raise bad(1, f"written by a newer harness (version {entry.get('version')})")
                continue
            kind = entry.get("type") if isinstance(entry, dict) else None
            try:
                if kind == "device":
                    yield kind, {"fingerprint": str(entry["fingerprint"]),
                                 "identity": dict(entry["identity"]),
                                 "first_seen": float(entry["first_seen"])}
                elif kind == "sample":
                    yield kind, {k: str(entry[k]) for k in ("space_fp", "input_sig", "sample",
                                                            "graph_hash")} | {
                        "created_at": float(entry["created_at"])}
                elif kind == "measurement":
                    measurement = Measurement.from_dict(entry["measurement"])
                    if measurement.source != "measured":
                        raise ValueError(f"source is {measurement.source!r}, only measured "
                                         f"results are imported")
                    yield kind, {"uid": str(entry["uid"]),
                                 "key": MeasurementKey(**entry["key"]),
                                 "measurement": measurement}
                else:
                    raise ValueError(f"unknown entry type {kind!r}")
            except (KeyError, TypeError, ValueError) as exc:
                raise bad(number, f"malformed {kind or 'entry'} ({type(exc).__name__}: {exc})"
                          ) from None
