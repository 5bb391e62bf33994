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

The newest measurement under a key is the one stored last (by rowid), never the one whose
date says so: dates come from other machines' clocks and from files. An imported export is
checked row by row (types, ranges, dates not in the future, keys that match the records they
carry, well-formed sample-index rows); rows that fail are skipped and reported, and a file
that is not a harness export is refused whole.
"""
import json
import logging
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

from devices.safe_files import NotARegularFile, replace_file
from harness.errors import CacheError
from harness.store.decisions import Decision
from harness.store.import_checks import (EXPORT_FORMAT, MAX_CLOCK_SKEW_S, SCHEMA_VERSION,
                                         ImportChecker,
                                         ImportCounts, finite, is_json_object, sample_labels)
from harness.store.key import MeasurementKey, canonical_json, model_of
from harness.store.measurement import STATISTICS, Measurement
from harness.store.rounds import LEVEL_QUANTILE, ReferenceLevel, quantile

log = logging.getLogger(__name__)

APPLICATION_ID = 0x484E5331  # "HNS1" in the SQLite header marks a harness cache
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

# Limit decisions (harness.store.decisions) with their evidence; never read as measurements. Added
# to caches of schema 1 as they are opened (an older harness ignores the table).
DECISIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    graph_hash    TEXT NOT NULL,
    input_sig     TEXT NOT NULL,
    settings_key  TEXT NOT NULL,
    device_fp     TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    median        REAL NOT NULL,
    record        TEXT NOT NULL,
    created_at    REAL NOT NULL
)"""

# The reference model's block statistics per device, settings and reference, one row per
# block of a window of interleaved rounds: the history its quiet level is read from
# (harness.store.rounds). Added to caches of schema 1 as they are opened.
REFERENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS reference_blocks (
    device_fp    TEXT NOT NULL,
    settings_key TEXT NOT NULL,
    reference    TEXT NOT NULL,
    window       TEXT NOT NULL,
    sequence     INTEGER NOT NULL,
    value        REAL NOT NULL,
    created_at   REAL NOT NULL,
    PRIMARY KEY (device_fp, settings_key, reference, window, sequence)
) WITHOUT ROWID"""
BUSY_TIMEOUT_S = 60.0  # how long a write waits for another process's write
REFERENCE_HISTORY = 2000  # the newest reference blocks a quiet level is read from

_KEY_WHERE = ("graph_hash = ? AND input_sig = ? AND settings_key = ? AND device_fp = ? "
              "AND agent_version = ?")


class Cache:
    """A harness cache file; see the module docstring."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._check_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot open the cache {self.path}: {exc.strerror or exc} "
                             f"({exc.filename or self.path.parent})",
                             fix="point $HARNESS_HOME (or --cache) at a folder on a writable "
                                 "disk, e.g. HARNESS_HOME=~/.harness; /proc, /sys and "
                                 "read-only filesystems cannot hold it") from None
        with self._guard("open"):
            self._conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S,
                                         isolation_level=None, check_same_thread=False)
            try:
                self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                self._prepare()
                self._use_wal()
            except BaseException:
                self._conn.close()  # a cache that failed to open holds no connection
                raise

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
            conn.execute(DECISIONS_SCHEMA)
            conn.execute(REFERENCE_SCHEMA)
            conn.execute("CREATE INDEX IF NOT EXISTS reference_blocks_by_time ON "
                         "reference_blocks (device_fp, settings_key, reference, created_at)")
            conn.execute("CREATE INDEX IF NOT EXISTS decisions_by_key ON decisions "
                         "(graph_hash, input_sig, settings_key, device_fp, agent_version)")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _use_wal(self) -> None:
        """Put the file in WAL mode (a no-op, without any lock, once it is in it).

        SQLite answers "database is locked" at once, without its busy timeout, when the switch
        of a new file meets another process's write transaction (several processes opening a
        new cache at the same moment), so the switch is retried, each try waiting at most
        what is left of BUSY_TIMEOUT_S. A filesystem that keeps no WAL (some network ones)
        leaves the file in its own mode, with a warning: it works, with less concurrency.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                left = deadline - time.monotonic()
                if "locked" not in str(exc) or left <= 0:
                    raise
                self._conn.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
                time.sleep(min(0.05, left))
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if str(mode).lower() != "wal":
            log.warning("cache %s stays in journal mode %s (its filesystem keeps no WAL): "
                        "several processes writing at once wait longer for each other",
                        self.path, mode)
        self._conn.execute("PRAGMA synchronous = NORMAL")

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
            if "locked" in text:
                raise CacheError(f"cache {self.path} failed to {what} ({text}): another "
                                 f"process held its lock for over {BUSY_TIMEOUT_S:g} s, or "
                                 f"its filesystem has no working locks",
                                 fix=f"find the process that holds it ('fuser {self.path}') "
                                     f"and let it finish, or put the cache on a local disk "
                                     f"(--cache or $HARNESS_HOME)") from exc
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

    def units_of_model(self, fingerprint: str, model: Mapping[str, Any]) -> List[str]:
        """`fingerprint`, then every other recorded device whose identity, without its unit,
        is `model`: the units of one model that a pool of a kind may answer from."""
        wanted = canonical_json(dict(model))
        found = [fingerprint]
        for other, identity in self._query("read devices",
                                                 "SELECT fingerprint, identity FROM devices "
                                                 "ORDER BY first_seen"):
            try:
                recorded = json.loads(identity)
            except ValueError:
                continue
            if isinstance(recorded, dict) and canonical_json(model_of(recorded)) == wanted \
                    and other != fingerprint:
                found.append(other)
        return found

    # ------------------------------------------------------------ measurements

    def statistics_by_sample(self, space_fp: str, input_sig: str, settings_key: str,
                             device_fp: str, agent_version: str, statistic: str,
                             sample: Optional[str] = None) -> Dict[str, float]:
        """{sample key: statistic of its newest measurement} for every indexed sample of a
        space (or just `sample`) that has a measurement under these settings, device and
        agent: one query that lets a profiler answer a whole resumed sweep from memory."""
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        column = statistic if statistic not in ("quiet", "ratio") else "record"
        one = "AND s.sample = ? " if sample is not None else ""
        rows = self._query(
            "read measurements",
            f"SELECT s.sample, m.{column} FROM samples s JOIN measurements m "
            "ON m.graph_hash = s.graph_hash AND m.input_sig = s.input_sig "
            f"WHERE s.space_fp = ? AND s.input_sig = ? {one}AND m.settings_key = ? "
            "AND m.device_fp = ? AND m.agent_version = ? ORDER BY m.rowid",
            (space_fp, input_sig, *((sample,) if sample is not None else ()), settings_key,
             device_fp, agent_version))
        # Stored last wins. A sample key that is not a JSON object (a damaged row) is left
        # out: callers parse the keys. A statistic of interleaved rounds is read from the
        # record, and a sample whose newest measurement has none is left out.
        if column == "record":
            rows = [(text, self._decode(record)) for text, record in rows]
            rows = [(text, m.statistic(statistic)) for text, m in rows if m.interleaved]
        return {text: value for text, value in rows if is_json_object(text)}

    def get(self, key: MeasurementKey) -> Optional[Measurement]:
        """The measurement stored last under `key`, as source="cached", or None."""
        rows = self._query("read a measurement",
                           f"SELECT record FROM measurements WHERE {_KEY_WHERE} "
                           "ORDER BY rowid DESC LIMIT 1", key.values())
        if not rows:
            return None
        return self._decode(rows[0][0]).with_source("cached")

    def newest(self, key: MeasurementKey, accepts: Callable[[Measurement], bool],
               depth: int = 50) -> Optional[Measurement]:
        """The newest of the last `depth` measurements under `key` that `accepts` takes (a
        request of one protocol passes over the other's), as source="cached", or None."""
        rows = self._query("read measurements",
                           f"SELECT record FROM measurements WHERE {_KEY_WHERE} "
                           "ORDER BY rowid DESC LIMIT ?", (*key.values(), depth))
        for (record,) in rows:
            measurement = self._decode(record)
            if accepts(measurement):
                return measurement.with_source("cached")
        return None

    def history(self, key: MeasurementKey) -> List[Measurement]:
        """Every measurement under `key`, in the order they were stored."""
        rows = self._query("read measurements",
                           f"SELECT record FROM measurements WHERE {_KEY_WHERE} "
                           "ORDER BY rowid", key.values())
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
        for derived in ("stats", "flags", "interleaved"):
            record.pop(derived, None)
        cursor = conn.execute(
            "INSERT OR IGNORE INTO measurements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (uid, *key.values(), measurement.device, measurement.median, measurement.mean,
             measurement.p90, measurement.p99, measurement.min, measurement.max,
             canonical_json(record), measurement.created_at))
        return cursor.rowcount

    def last_identity(self, devices: Sequence[str]) -> Optional[Tuple[str, str]]:
        """(device fingerprint, agent version) of the newest measurement by any of `devices`
        (names): who a device was when it last measured, for when it cannot be asked."""
        marks = ", ".join("?" for _ in devices)
        rows = self._query("read measurements", "SELECT device_fp, agent_version FROM "
                           f"measurements WHERE device IN ({marks}) ORDER BY rowid DESC LIMIT 1",
                           tuple(devices))
        return (rows[0][0], rows[0][1]) if rows else None

    # ------------------------------------------------------------ reading it all (reports)

    def measurement_counts(self) -> Dict[str, int]:
        """{device name: how many measurements it stored} for every device with one, by name."""
        rows = self._query("count measurements", "SELECT CAST(device AS TEXT), COUNT(*) FROM "
                                                 "measurements GROUP BY 1 ORDER BY 1")
        return {name: count for name, count in rows if name is not None}

    def newest_measurements(self, devices: Optional[Sequence[str]] = None
                            ) -> List[Tuple[MeasurementKey, Measurement]]:
        """The measurement stored last for each (device name, graph hash, input signature,
        settings key: precision and provider among them), of `devices` (names) or of every
        device, with its key, in the order they were stored. Returned as stored (source
        "measured"): what a report of the cache shows."""
        args: Tuple[str, ...] = tuple(devices or ())
        where = f"WHERE device IN ({', '.join('?' for _ in args)}) " if devices is not None else ""
        rows = self._query(
            "read measurements",
            "SELECT graph_hash, input_sig, settings_key, device_fp, agent_version, record "
            "FROM measurements WHERE rowid IN (SELECT MAX(rowid) FROM measurements "
            f"{where}GROUP BY device, graph_hash, input_sig, settings_key) ORDER BY rowid", args)
        return [(MeasurementKey(*row[:5]), self._decode(row[5])) for row in rows]

    def sample_index(self) -> List[Tuple[str, str, str, str]]:
        """Every row of the sample index as (space fingerprint, input signature, sample key,
        graph hash), oldest first."""
        rows = self._query("read the sample index", "SELECT space_fp, input_sig, sample, "
                                                    "graph_hash FROM samples ORDER BY created_at")
        return [(space_fp, input_sig, sample, graph) for space_fp, input_sig, sample, graph in rows]

    # ------------------------------------------------------------ decisions

    def reference_level(self, device_fp: str, settings_key: str, reference: str, window: str,
                        blocks: Sequence[Tuple[int, float, float]]) -> ReferenceLevel:
        """Record a window's reference blocks ((sequence, statistic ms, when), once however
        many of its candidates are stored), keep the newest REFERENCE_HISTORY of this device,
        settings and reference, and return their quiet level (ReferenceLevel: a low quantile,
        with its interval)."""
        scope = (device_fp, settings_key, reference)
        with self._write("record the reference's blocks") as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO reference_blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*scope, window, sequence, value, when) for sequence, value, when in blocks])
            conn.execute("DELETE FROM reference_blocks WHERE device_fp = ? AND settings_key = ? "
                         "AND reference = ? AND created_at < (SELECT MIN(created_at) FROM "
                         "(SELECT created_at FROM reference_blocks WHERE device_fp = ? AND "
                         "settings_key = ? AND reference = ? ORDER BY created_at DESC "
                         f"LIMIT {REFERENCE_HISTORY}))", (*scope, *scope))
            rows = conn.execute("SELECT value FROM reference_blocks WHERE device_fp = ? AND "
                                "settings_key = ? AND reference = ?", scope).fetchall()
        return ReferenceLevel.of([value for (value,) in rows])

    def known_reference(self, device_fp: str, settings_key: str, reference: str
                        ) -> Tuple[Optional[float], int]:
        """The quiet level (ReferenceLevel's quantile) of the newest REFERENCE_HISTORY
        recorded reference blocks of this device, settings and reference (the blocks
        reference_level keeps, also where a history was merged from several caches), or
        None when none is recorded; and how many blocks it stands on."""
        rows = self._query("read the reference's blocks",
                           "SELECT value FROM reference_blocks WHERE device_fp = ? AND "
                           "settings_key = ? AND reference = ? ORDER BY created_at DESC "
                           f"LIMIT {REFERENCE_HISTORY}", (device_fp, settings_key, reference))
        level = quantile([value for (value,) in rows], LEVEL_QUANTILE) if rows else None
        return level, len(rows)

    def newest_history(self, device_fp: str, settings_keys: Sequence[str], reference: str
                       ) -> Optional[str]:
        """Of `settings_keys`, the one this device's newest recorded block of the reference
        is kept under (None: none of them holds a block): which of several ways of reading
        the reference the device was read by last."""
        if not settings_keys:
            return None
        marks = ", ".join("?" * len(settings_keys))
        rows = self._query("read the reference's blocks",
                           "SELECT settings_key FROM reference_blocks WHERE device_fp = ? AND "
                           f"reference = ? AND settings_key IN ({marks}) "
                           "ORDER BY created_at DESC LIMIT 1",
                           (device_fp, reference, *settings_keys))
        return str(rows[0][0]) if rows else None

    def reference_history(self, device_fp: str) -> List[Tuple[float, float]]:
        """(when, reference block statistic in ms) of the recorded reference blocks of a
        device under the settings and reference it used last, oldest first: how fast the
        device ran over time."""
        rows = self._query(
            "read the reference's blocks",
            "SELECT created_at, value FROM reference_blocks r WHERE device_fp = ? AND "
            "(settings_key, reference) = (SELECT settings_key, reference FROM reference_blocks "
            "WHERE device_fp = r.device_fp ORDER BY created_at DESC LIMIT 1) "
            "ORDER BY created_at", (device_fp,))
        return [(float(when), float(value)) for when, value in rows]

    def put_decision(self, key: MeasurementKey, decision: Decision,
                     samples_ms: Sequence[float]) -> None:
        """Store a measured decision with its evidence (the runs behind it); only ever read
        back as a decision."""
        if decision.source != "measured":
            raise ValueError(f"only measured decisions are stored, not {decision.source!r} ones")
        record = dict(decision.to_dict(), samples_ms=list(samples_ms))
        with self._write("store a decision") as conn:
            self._insert_decision(conn, key, record)

    @staticmethod
    def _insert_decision(conn: sqlite3.Connection, key: MeasurementKey,
                         record: Dict[str, Any]) -> int:
        """Store a decision's record (with its samples_ms) unless the very same one is there
        (an export imported twice adds nothing); 1 when it was added."""
        text = canonical_json(record)
        if conn.execute(f"SELECT 1 FROM decisions WHERE {_KEY_WHERE} AND record = ? LIMIT 1",
                        (*key.values(), text)).fetchone():
            return 0
        conn.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (*key.values(), record["median_ms"], text, record["created_at"]))
        return 1

    def decisions(self, key: MeasurementKey) -> List[Decision]:
        """The decisions stored under `key`, newest first, as source="cached"."""
        rows = self._query("read decisions", f"SELECT record FROM decisions WHERE {_KEY_WHERE} "
                           "ORDER BY rowid DESC", key.values())
        found = []
        for (record,) in rows:
            try:
                data = json.loads(record)
                data.pop("samples_ms", None)
                found.append(Decision.from_dict(data).with_source("cached"))
            except (ValueError, TypeError, KeyError):  # a damaged row is evidence of nothing
                continue
        return found

    def decided_medians_by_sample(self, space_fp: str, input_sig: str, settings_key: str,
                                  device_fp: str, agent_version: str) -> Dict[str, float]:
        """{sample key: median of its newest decision} for the indexed samples of a space."""
        rows = self._query(
            "read decisions",
            "SELECT s.sample, d.median FROM samples s JOIN decisions d "
            "ON d.graph_hash = s.graph_hash AND d.input_sig = s.input_sig "
            "WHERE s.space_fp = ? AND s.input_sig = ? AND d.settings_key = ? "
            "AND d.device_fp = ? AND d.agent_version = ? ORDER BY d.rowid",
            (space_fp, input_sig, settings_key, device_fp, agent_version))
        return {text: value for text, value in rows if is_json_object(text)}

    # ------------------------------------------------------------ reports, export, import

    def stats(self) -> Dict[str, Any]:
        """Counts for `harness cache stats`."""
        def count(table: str) -> int:
            return self._query("count rows", f"SELECT COUNT(*) FROM {table}")[0][0]

        # Rows stored by older versions (or imported by them) may hold a date that is text,
        # not finite, or in the future: such dates count as odd and are never the latest.
        horizon = time.time() + MAX_CLOCK_SKEW_S
        sane = ("typeof(created_at) IN ('integer', 'real') AND created_at >= 0 "
                "AND created_at <= ?")
        per_device = self._query("count measurements",
                                 "SELECT CAST(device AS TEXT), COUNT(*), "
                                 "COUNT(DISTINCT graph_hash), "
                                 f"MAX(CASE WHEN {sane} THEN created_at END), "
                                 f"SUM(CASE WHEN {sane} THEN 0 ELSE 1 END) "
                                 "FROM measurements GROUP BY 1 ORDER BY 1",
                                 (horizon, horizon))
        keys = self._query("count keys", "SELECT COUNT(*) FROM (SELECT DISTINCT graph_hash, "
                           "input_sig, settings_key, device_fp, agent_version FROM measurements)")
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
            "schema_version": SCHEMA_VERSION,
            "measurements": count("measurements"),
            "distinct_keys": keys[0][0],
            "samples_indexed": count("samples"),
            # devices by name, as listed below; alike devices (a farm's boards of one model)
            # share one fingerprint, so there may be fewer of those
            "devices": len(per_device),
            "fingerprints": count("devices"),
            "per_device": [{"device": d if d is not None else "?", "measurements": n,
                            "graphs": g, "latest": finite(t), "odd_dates": odd or 0}
                           for d, n, g, t, odd in per_device],
        }

    def export_jsonl(self, path: Union[str, Path]) -> Dict[str, int]:
        """Write every row as JSON Lines (a header line first), decisions included; returns
        counts per type. The file appears whole or not at all (devices.safe_files): a target
        that is a folder, a device node (/dev/null, /dev/full) or anything else but a regular
        file, a folder that does not exist, or a write that fails (a full disk), raises
        CacheError and leaves nothing behind, an earlier export at that path untouched."""
        counts = {"device": 0, "sample": 0, "measurement": 0, "decision": 0}
        target = Path(path)
        fix = "name a file in an existing folder, e.g. 'harness cache export ./cache.jsonl'"
        if target.is_dir():
            raise CacheError(f"cannot export to {target}: it is a folder", fix=fix)
        if not target.parent.is_dir():
            what = "is not a folder" if target.parent.exists() else "does not exist"
            raise CacheError(f"cannot export to {target}: {target.parent} {what}",
                             fix=f"create the folder {target.parent} first, or {fix}")
        try:
            replace_file(target, lambda out: self._export_rows(out, counts))
        except NotARegularFile as exc:
            raise CacheError(f"cannot export to {target}: {exc.strerror}",
                             fix=f"an export is a regular file: {fix}") from None
        except OSError as exc:
            raise CacheError(f"cannot write the export {target}: {exc.strerror or exc}",
                             fix="check the folder's permissions and free space, or " + fix) \
                from None
        return counts

    def _export_rows(self, out: BinaryIO, counts: Dict[str, int]) -> None:
        def line(row: Dict[str, Any]) -> None:
            out.write((canonical_json(row) + "\n").encode("utf-8"))
            counts[row["type"]] = counts.get(row["type"], 0) + 1

        with self._lock, self._guard("export"):
            out.write((canonical_json({"type": EXPORT_FORMAT, "version": SCHEMA_VERSION})
                       + "\n").encode("utf-8"))
            for fp, identity, first_seen in self._conn.execute("SELECT * FROM devices"):
                line({"type": "device", "fingerprint": fp, "identity": json.loads(identity),
                      "first_seen": first_seen})
            for space_fp, input_sig, sample, graph_hash, created in self._conn.execute(
                    "SELECT * FROM samples"):
                line({"type": "sample", "space_fp": space_fp, "input_sig": input_sig,
                      "sample": sample, "graph_hash": graph_hash, "created_at": created})
            for row in self._conn.execute(
                    "SELECT uid, graph_hash, input_sig, settings_key, device_fp, agent_version, "
                    "record FROM measurements ORDER BY rowid"):
                line({"type": "measurement", "uid": row[0],
                      "key": MeasurementKey(*row[1:6]).to_dict(),
                      "measurement": json.loads(row[6])})
            for row in self._conn.execute(
                    "SELECT graph_hash, input_sig, settings_key, device_fp, agent_version, "
                    "record FROM decisions ORDER BY rowid"):
                line({"type": "decision", "key": MeasurementKey(*row[:5]).to_dict(),
                      "decision": json.loads(row[5])})

    def import_jsonl(self, path: Union[str, Path]) -> "ImportCounts":
        """Read an export and add its rows in one transaction, in the file's order (so what
        the file stored last is newest here too). Every row is checked first (see
        ImportChecker); a row that fails is skipped, and named with its line and reason in
        the result's `skipped`. Rows already present are left as they are. A file that is not
        a harness export (binary, not JSON Lines, no export header, a newer format) raises
        CacheError and nothing is imported. Returns the counts of new rows by type."""
        path = Path(path)
        labels: Dict[str, Tuple[str, ...]] = {}  # the labels of each space already indexed
        for space_fp, sample in self._query("read the sample index",
                                            "SELECT space_fp, sample FROM samples"):
            if space_fp not in labels:
                found = sample_labels(sample)
                if found is not None:
                    labels[space_fp] = found
        checker = ImportChecker(path, labels)
        entries = list(checker.read())
        added = {"device": 0, "sample": 0, "measurement": 0, "decision": 0}
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
                elif kind == "decision":
                    added[kind] += self._insert_decision(conn, entry["key"], entry["record"])
                else:
                    added[kind] += self._insert(conn, entry["uid"], entry["key"],
                                                entry["measurement"])
        return ImportCounts(added, checker.skipped)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


