"""The SQLite cache: round trips, several writers at once, export/import, files it must not touch."""
import hashlib
import json
import multiprocessing
import sqlite3
import threading
import time

import pytest

from harness.store.cache import Cache
from agents.ort_agent import parse_settings
from harness.store.key import MeasurementKey, digest, settings_key
from harness.errors import CacheError
from harness.store.measurement import Measurement

# Keys as the profiler makes them: sha256 hashes and digests, the device digest that of the
# identity the measurement carries (an import checks both).
IDENTITY = {"cpu_model": "test"}
INPUT_SIG = '[{"dtype":"float32","shape":[1,3,32,32]}]'
SETTINGS = {"intra_op_threads": 1}


def graph(n: int = 0) -> str:
    return hashlib.sha256(f"graph{n}".encode()).hexdigest()


def key(n: int = 0, device_fp: str = digest(IDENTITY)) -> MeasurementKey:
    return MeasurementKey(graph(n), INPUT_SIG, settings_key(parse_settings(SETTINGS)), device_fp,
                          "1.0")


def measurement(median: float = 2.0, source: str = "measured", n: int = 20,
                graph_n: int = 0) -> Measurement:
    samples = [median * (1 + 0.01 * ((i % 3) - 1)) for i in range(n)]
    return Measurement(samples_ms=samples, source=source, device="local",
                       graph_hash=graph(graph_n), load_ms=5.0, first_run_ms=3.0,
                       input_signature=json.loads(INPUT_SIG),
                       settings=dict(SETTINGS), device_fingerprint=IDENTITY,
                       agent_version="1.0", provenance={"capped": False})


def test_round_trip_keeps_every_sample(tmp_path):
    with Cache(tmp_path / "c.sqlite") as cache:
        assert cache.get(key()) is None
        original = measurement()
        cache.put(key(), original)
        back = cache.get(key())
        assert back.source == "cached"
        assert back.samples_ms == original.samples_ms
        assert back.with_source("measured") == original
        assert back.median == original.median and back.p99 == original.p99
        assert cache.get(key(1)) is None and cache.get(key(0, device_fp="other")) is None


def test_newest_answers_and_history_is_kept(tmp_path):
    with Cache(tmp_path / "c.sqlite") as cache:
        cache.put(key(), measurement(2.0))
        time.sleep(0.01)
        cache.put(key(), measurement(3.0))
        assert cache.get(key()).median == pytest.approx(3.0)
        assert [m.median for m in cache.history(key())] == pytest.approx([2.0, 3.0])


def test_predictions_and_cached_copies_are_never_stored(tmp_path):
    with Cache(tmp_path / "c.sqlite") as cache:
        for source in ("predicted", "cached"):
            with pytest.raises(ValueError, match="only measured"):
                cache.put(key(), measurement(source=source))
        assert cache.stats()["measurements"] == 0


def test_sample_index(tmp_path):
    with Cache(tmp_path / "c.sqlite") as cache:
        assert cache.lookup_sample("space", "sig", '{"a":1}') is None
        cache.put_sample("space", "sig", '{"a":1}', "graph0")
        assert cache.lookup_sample("space", "sig", '{"a":1}') == "graph0"
        assert cache.lookup_sample("other-space", "sig", '{"a":1}') is None


def _writer(path: str, worker: int, count: int) -> None:
    cache = Cache(path)
    for i in range(count):
        cache.put(key(worker * 1000 + i), measurement(1.0 + i))
        cache.put_sample("space", "sig", json.dumps({"w": worker, "i": i}), f"graph{i}")
    cache.close()


def test_several_processes_write_at_once_and_nothing_is_lost(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    workers, count = 4, 40
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(path, w, count)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    with Cache(path) as cache:
        stats = cache.stats()
        assert stats["measurements"] == workers * count
        assert stats["distinct_keys"] == workers * count
        assert stats["samples_indexed"] == workers * count
        assert cache.get(key(3 * 1000 + 39)).median == pytest.approx(40.0)
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def _lock_taken_at_the_wal_switch(monkeypatch, path, release_after_s=None):
    """Another connection takes the write lock of the new file at `path` just as Cache()
    switches it to WAL (a trace callback on Cache's connections sees the switch coming), and
    gives it back after `release_after_s` (None: never). The other connection, when the lock
    was taken, and the release timer are returned."""
    other = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    state = {"other": other, "taken_at": None, "timer": None}

    def take_the_lock(statement: str) -> None:
        if "journal_mode = WAL" in statement and state["taken_at"] is None:
            other.execute("BEGIN IMMEDIATE")
            state["taken_at"] = time.monotonic()
            if release_after_s is not None:
                state["timer"] = threading.Timer(release_after_s, other.execute, ("COMMIT",))
                state["timer"].start()

    real_connect = sqlite3.connect

    def connect_with_trace(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(take_the_lock)
        return conn

    monkeypatch.setattr("harness.store.cache.sqlite3.connect", connect_with_trace)
    return state


def test_a_new_cache_waits_for_wal_while_another_process_writes(tmp_path, monkeypatch):
    """The race CI met: a process switches a new file to WAL just as another takes its write
    lock. SQLite answers "locked" at once there, without its busy timeout, so the switch must
    wait for the lock, not fail the open."""
    path = tmp_path / "new.sqlite"
    state = _lock_taken_at_the_wal_switch(monkeypatch, path, release_after_s=0.3)
    try:
        with Cache(path) as cache:
            opened_at = time.monotonic()
            cache.put(key(), measurement())
        assert state["taken_at"] is not None, "the lock was never taken at the switch"
        assert opened_at - state["taken_at"] >= 0.3  # it waited for the lock to go
    finally:
        if state["timer"] is not None:
            state["timer"].join()
        state["other"].close()
    check = sqlite3.connect(str(path))
    try:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        check.close()


def test_a_wal_switch_that_never_gets_the_lock_is_a_cache_error(tmp_path, monkeypatch):
    path = tmp_path / "new.sqlite"
    state = _lock_taken_at_the_wal_switch(monkeypatch, path)
    monkeypatch.setattr("harness.store.cache.BUSY_TIMEOUT_S", 0.3)
    try:
        with pytest.raises(CacheError, match="held its lock for over 0.3 s") as caught:
            Cache(path)
        assert state["taken_at"] is not None and "fuser" in caught.value.fix
    finally:
        state["other"].execute("ROLLBACK")
        state["other"].close()
    monkeypatch.undo()
    with Cache(path) as cache:  # the file it made is a sound cache once the lock is gone
        assert cache.stats()["measurements"] == 0


def test_a_lock_held_too_long_is_a_cache_error_that_says_so(tmp_path, monkeypatch):
    path = tmp_path / "held.sqlite"
    Cache(path).close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr("harness.store.cache.BUSY_TIMEOUT_S", 0.3)
    try:
        with pytest.raises(CacheError, match="held its lock") as caught:
            Cache(path)
        assert "fuser" in caught.value.fix
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with Cache(path) as cache:
        assert cache.stats()["measurements"] == 0


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"my thesis draft, not a database\n" * 100)
    before = path.read_bytes()
    with pytest.raises(CacheError) as caught:
        Cache(path)
    assert "not a SQLite database" in str(caught.value) and "move" in caught.value.fix
    assert path.read_bytes() == before


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "cache.sqlite"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
    other.execute("INSERT INTO invoices VALUES (1, 9.5)")
    other.commit()
    other.close()
    before = path.read_bytes()
    with pytest.raises(CacheError, match="another program.*invoices"):
        Cache(path)
    assert path.read_bytes() == before


def test_a_corrupt_cache_gives_a_clear_error_and_is_not_overwritten(tmp_path):
    path = tmp_path / "cache.sqlite"
    with Cache(path) as cache:
        for i in range(200):
            cache.put(key(i), measurement())
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    data = bytearray(path.read_bytes())
    data[4096 * 2: 4096 * 6] = b"\xde\xad\xbe\xef" * 4096  # wreck pages 3 to 6
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError) as caught:
        cache = Cache(path)
        cache.stats()
        for i in range(200):
            cache.get(key(i))
    assert "corrupt" in str(caught.value) and ".recover" in caught.value.fix
    assert path.read_bytes() == bytes(data)


def test_a_cache_from_a_newer_harness_is_refused(tmp_path):
    path = tmp_path / "cache.sqlite"
    Cache(path).close()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.commit()
    connection.close()
    with pytest.raises(CacheError, match="newer harness"):
        Cache(path)


def test_export_and_import_round_trip(tmp_path):
    source = Cache(tmp_path / "a.sqlite")
    for i in range(5):
        source.put(key(i), measurement(1.0 + i, graph_n=i))
    source.put_sample(digest("space"), INPUT_SIG, '{"a":1}', graph(0))
    source.put_device(digest(IDENTITY), IDENTITY)
    exported = tmp_path / "dump.jsonl"
    assert source.export_jsonl(exported) == {"device": 1, "sample": 1, "measurement": 5, "decision": 0}
    target = Cache(tmp_path / "b.sqlite")
    assert target.import_jsonl(exported) == {"device": 1, "sample": 1, "measurement": 5, "decision": 0}
    assert target.import_jsonl(exported) == {"device": 0, "sample": 0, "measurement": 0, "decision": 0}
    for i in range(5):
        assert target.get(key(i)) == source.get(key(i))
    assert target.lookup_sample(digest("space"), INPUT_SIG, '{"a":1}') == graph(0)


def test_a_malformed_import_names_the_line(tmp_path):
    source = Cache(tmp_path / "a.sqlite")
    for i in range(3):
        source.put(key(i), measurement(graph_n=i))
    exported = tmp_path / "dump.jsonl"
    source.export_jsonl(exported)
    lines = exported.read_text().splitlines()
    record = json.loads(lines[3])
    record["measurement"]["source"] = "predicted"
    lines[3] = json.dumps(record)
    exported.write_text("\n".join(lines) + "\n")
    target = Cache(tmp_path / "b.sqlite")
    lines[3] = "{truncated"  # a line that is not JSON: the file is damaged, nothing goes in
    (tmp_path / "damaged.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CacheError, match="line 4 is not JSON"):
        target.import_jsonl(tmp_path / "damaged.jsonl")
    assert target.stats()["measurements"] == 0
    (tmp_path / "other.jsonl").write_text('{"hello": "world"}\n')
    with pytest.raises(CacheError, match="line 1 is no harness-cache-export header"):
        target.import_jsonl(tmp_path / "other.jsonl")
    # A prediction is a row that fails its checks: skipped and named, the others go in.
    counts = target.import_jsonl(exported)
    assert counts == {"device": 0, "sample": 0, "measurement": 2, "decision": 0}
    assert [(row.line, row.kind) for row in counts.skipped] == [(4, "measurement")]
    assert "predicted" in counts.skipped[0].reason
    assert target.get(key(2)) is None
