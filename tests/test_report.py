"""`harness report`: from a cache of real measurements to a page that a real browser renders.

The cache holds TinySpace subnets measured on `local`, the same subnets stored again as a
second device (slower, another fingerprint), a calibration of that device, and a device whose
name and architecture are HTML. The page is opened in Debian's chromium, headless: its DOM
after the page's own script ran, and a screenshot.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List

import pytest

from harness.store.cache import Cache
from harness.store.key import MeasurementKey, canonical_json, digest
from harness.predict.calibration import Calibration, calibrations_folder
from harness.cli import main
from harness.profiler import LatencyProfiler
from harness.spaces.space import random_samples
from harness.spaces import TinySpace
from tests.conftest import FAST

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test installs it: "
                             "apt-get install --no-install-recommends chromium)")
EVIL = "<script>alert('device')</script>"
EVIL_CHOICE = "<img src=x onerror=alert(1)>"


@dataclass
class Built:
    home: Path
    cache: Path
    graphs: List[str]          # distinct graph hashes measured on local (and board-b)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """A real cache: TinySpace subnets measured on local, copied as board-b (1.8x slower);
    a calibration of board-b; an HTML-named device with a sample whose choice is HTML."""
    home = tmp_path_factory.mktemp("report-home")
    path = home / "cache.sqlite"
    space = TinySpace()
    with LatencyProfiler(space, space.dummy_input(), settings=FAST, home=home,
                         cache=path) as profiler:
        measured = profiler.measure_many(random_samples(space, 5, seed=4), progress=False)
    with Cache(path) as cache:
        originals = cache.newest_measurements()
        identity = dict(originals[0][1].device_fingerprint, cpu_model="Cortex-A72 (test)")
        board_fp = digest(identity)
        cache.put_device(board_fp, identity)
        for key, m in originals:
            copy = dataclasses.replace(m, device="board-b", device_fingerprint=identity,
                                       samples_ms=tuple(1.8 * x for x in m.samples_ms))
            cache.put(dataclasses.replace(key, device_fp=board_fp), copy)
        key, m = originals[0]
        evil_graph = "e" * 64
        evil = dataclasses.replace(m, device=EVIL, graph_hash=evil_graph)
        cache.put(MeasurementKey(evil_graph, key.input_sig, key.settings_key, "f" * 64,
                                 key.agent_version), evil)
        cache.put_sample("0" * 64, key.input_sig, canonical_json({"op": EVIL_CHOICE}), evil_graph)
    graphs = sorted({m.graph_hash for m in measured})
    _calibrate(home, [m.median * 1.8 for m in measured])
    return Built(home, path, graphs)


def _calibrate(home: Path, measured: List[float]) -> None:
    """What `harness calibrate --device board-b` stores, with made-up predictions."""
    folder = calibrations_folder(home) / "board-b"
    Calibration(device="board-b", base_predictor=str(folder / "kernels"),
                base_predictor_digest="0" * 64, intercept=0.1, slope=1.0, kind="scale",
                device_fingerprint="0" * 64, agent_version="1", settings_key="0" * 64,
                space="harness.spaces:TinySpace", space_fingerprint="0" * 64,
                input_signature=[], n_train=8, n_holdout=len(measured),
                report={"calibrated": {"acc5": 0.6, "acc10": 0.8, "rmspe": 7.5,
                                       "kendall_tau": 0.9, "n": len(measured)}}).save(folder)
    (folder / "holdout.json").write_text(json.dumps({
        "samples": [], "measured_ms": measured,
        "predicted_ms": {"nn-Meter device kernels": [v * 0.7 for v in measured],
                         "calibrated": [v * 1.04 for v in measured]}}))


@pytest.fixture
def at_home(built, monkeypatch) -> Built:
    """The built cache's home as $HARNESS_HOME (where the report finds calibrations)."""
    monkeypatch.setenv("HARNESS_HOME", str(built.home))
    return built


def report(built: Built, out: Path, *args: str) -> int:
    return main(["--cache", str(built.cache), "report", "--out", str(out), *args])


# ---------------------------------------------------------------- reading the page back

class Page(HTMLParser):
    """The tables of a page (rows of cell texts, by the device of their section), its images
    and the attributes of <body>."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: Dict[str, List[List[str]]] = {}
        self.headers: Dict[str, List[str]] = {}
        self.images: List[Dict[str, str]] = []
        self.body: Dict[str, str] = {}
        self.scripts = 0
        self._device = ""
        self._row: List[str] = []
        self._cell: List[str] = []
        self._in_cell = False
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = attributes
        elif tag == "section" and "data-device" in attributes:
            self._device = attributes["data-device"] + (
                " kernels" if attributes.get("data-kind") == "kernels" else "")
            self.tables[self._device], self.headers[self._device] = [], []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell, self._in_cell = [], True
        elif tag == "img":
            self.images.append(attributes)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append("".join(self._cell).strip())
            self._in_cell = False
        elif tag == "tr" and self._device:
            if self._in_body:
                self.tables[self._device].append(self._row)
            else:
                self.headers[self._device] = self._row
        elif tag == "tbody":
            self._in_body = False
        elif tag == "section":
            self._device = ""

    def handle_data(self, data):
        if self._in_cell:
            self._cell.append(data)

    def column(self, device: str, header: str) -> List[str]:
        index = next(i for i, h in enumerate(self.headers[device]) if h.startswith(header))
        return [row[index] for row in self.tables[device]]


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Debian's chromium, headless, on `url`: its stdout (the DOM with --dump-dom)."""
    assert CHROMIUM is not None
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--run-all-compositor-stages-before-draw",
         "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# ---------------------------------------------------------------- the tests

def test_report_files_and_tables(at_home, tmp_path, capsys):
    out = tmp_path / "report"
    assert report(at_home, out, "--device", "local", "board-b") == 0
    said = capsys.readouterr().out
    assert f"report of {len(at_home.graphs)} subnets (variants apart) on 2 devices" in said
    assert (out / "index.html").is_file()
    for name in ("devices.png", "runs.png", "calibration-1.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "flops.png").exists()  # no --space: FLOPs unknown, and the page says so
    text = (out / "index.html").read_text()
    assert "pass --space MODULE:ATTR" in text
    assert "nothing in this cache is measured per operator" in text
    assert "src=\"http" not in text and "<link" not in text  # nothing loaded from elsewhere
    page = Page(text)
    assert len(page.images) == 3 and all(i["src"].startswith("data:image/png;base64,")
                                         for i in page.images)
    for device in ("local", "board-b"):
        assert sorted(page.column(device, "graph")) == sorted(g[:10] for g in at_home.graphs)
    local = [float(v) for v in page.column("local", "median")]
    board = [float(v) for v in page.column("board-b", "median")]
    assert board == pytest.approx([1.8 * v for v in local], rel=0.01, abs=0.002)  # 3 decimals
    assert all(re.fullmatch(r"\d+\.\d{3}", v) for v in page.column("local", "p90"))
    assert all(a.startswith("s1: ") for a in page.column("local", "architecture"))


@needs_chromium
def test_report_renders_in_chromium(at_home, tmp_path):
    out = tmp_path / "report"
    assert report(at_home, out, "--device", "local", "board-b") == 0
    url = (out / "index.html").as_uri()
    page = Page(chromium(tmp_path, url, "--dump-dom"))
    assert page.body.get("data-images") == "ok", page.images
    assert len(page.images) == 3
    assert all(int(img["data-natural-width"]) > 300 for img in page.images)
    for device in ("local", "board-b"):
        assert len(page.tables[device]) == len(at_home.graphs)

    shot = tmp_path / "report.png"
    chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    kept = os.environ.get("HARNESS_REPORT_SCREENSHOT")  # to look at it: set to a file path
    if kept:
        shutil.copy(shot, kept)


@needs_chromium
def test_report_sorts_in_chromium(at_home, tmp_path):
    out = tmp_path / "report"
    assert report(at_home, out, "--device", "local", "board-b") == 0
    url = (out / "index.html").as_uri()
    for query, descending in (("?sort=median", False), ("?sort=median&desc", True)):
        page = Page(chromium(tmp_path, url + query, "--dump-dom"))
        assert page.body.get("data-sorted") == "median"
        for device in ("local", "board-b"):
            medians = [float(v) for v in page.column(device, "median")]
            assert medians == sorted(medians, reverse=descending)
            assert len(medians) == len(at_home.graphs)


def test_report_with_space_counts_flops(at_home, tmp_path):
    out = tmp_path / "report"
    assert report(at_home, out, "--space", "harness.spaces:TinySpace") == 0
    assert (out / "flops.png").read_bytes()[:4] == b"\x89PNG"
    page = Page((out / "index.html").read_text())
    assert EVIL not in page.tables  # not a subnet of TinySpace
    assert all(float(v) > 0 for v in page.column("local", "MMACs"))


def test_report_escapes_what_users_wrote(at_home, tmp_path):
    out = tmp_path / "report"
    assert report(at_home, out) == 0
    text = (out / "index.html").read_text()
    assert EVIL not in text and EVIL_CHOICE not in text
    assert "&lt;script&gt;alert(&#x27;device&#x27;)&lt;/script&gt;" in text
    page = Page(text)
    assert page.scripts == 1
    assert page.column(EVIL, "architecture") == ["o" + EVIL_CHOICE]  # text, not markup


def test_report_never_writes_through_a_link(at_home, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (out / "index.html").symlink_to(victim)
    assert report(at_home, out) == 0
    assert victim.read_text() == "mine"
    assert not (out / "index.html").is_symlink()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no leftovers


@pytest.mark.parametrize("case, words", [
    ("missing cache", ["no cache to report on", "does not exist", "fix:"]),
    ("empty cache", ["holds no measurements", "harness profile"]),
    ("unknown device", ["no measurement of device 'pixel9'", "board-b", "local"]),
    ("out is a file", ["is a file, not a folder"]),
    ("out is a link", ["is a symbolic link"]),
    ("out has no parent", ["does not exist"]),
    ("out not writable", ["cannot"]),
])
def test_report_errors_are_one_line_with_a_fix(at_home, tmp_path, capsys, case, words):
    out = tmp_path / "report"
    cache = str(at_home.cache)
    args = ["--device", "local"]
    if case == "missing cache":
        cache = str(tmp_path / "nothing.sqlite")
    elif case == "empty cache":
        cache = str(tmp_path / "empty.sqlite")
        Cache(cache).close()
    elif case == "unknown device":
        args = ["--device", "pixel9"]
    elif case == "out is a file":
        out.write_text("a file")
    elif case == "out is a link":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    elif case == "out has no parent":
        out = tmp_path / "no" / "such" / "report"
    elif case == "out not writable":
        if os.geteuid() == 0:
            out = Path("/proc/harness-report")  # not even root creates folders there
        else:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            out = locked / "report"
    code = main(["--cache", cache, "report", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("harness: error: ") and "Traceback" not in err
    for word in words:
        assert word in err
    if case == "out is a link":
        assert list((tmp_path / "elsewhere").iterdir()) == []
    if case in ("missing cache", "empty cache", "unknown device"):
        assert not (out / "index.html").exists()
    if case == "missing cache":
        assert not Path(cache).exists()  # looking did not create one


# ---------------------------------------------------------------- a mixed cache

def test_report_of_a_mixed_cache_shows_every_variant_apart(home, tmp_path, dynamic_model):
    """fp32 and int8 of a space's subnets, a model file at two shapes, an older measurement,
    and a kernel calibration measured: a row per variant, the kernel in its own table and not
    in the charts, true counts, and a page that fits a 1280 px screen in chromium."""
    import torch

    path = home / "cache.sqlite"
    space = TinySpace()
    samples = random_samples(space, 3, seed=11)
    for precision in ("fp32", "int8-dynamic"):
        with LatencyProfiler(space, space.dummy_input(), settings=FAST, home=home, cache=path,
                             precision=precision) as profiler:
            profiler.measure_many(samples, progress=False)
    with LatencyProfiler(space, space.dummy_input(), settings=FAST, home=home, cache=path,
                         refresh=True) as profiler:
        profiler.measure(samples[0])  # an older measurement of a variant shown
    with LatencyProfiler(None, None, settings=FAST, home=home, cache=path) as profiler:
        for batch in (1, 8):
            profiler.measure_model(dynamic_model, {"x": [batch, 4]})
        kernel = profiler.measure_module(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16))
    folder = calibrations_folder(home) / "local"
    (folder / "kernels").mkdir(parents=True)
    (folder / "kernels" / "kernels.json").write_text(json.dumps(
        {"conv-bn-relu": {"conv-bn-relu_0": {"config": {}, "model": "conv",
                                             "graph_hash": kernel.graph_hash,
                                             "latency": f"{kernel.median} +- 0"}}}))

    out = tmp_path / "report"
    assert main(["--cache", str(path), "report", "--out", str(out)]) == 0
    text = (out / "index.html").read_text()
    page = Page(text)
    variants = page.column("local", "variant")
    assert len(variants) == 3 * 2 + 2
    assert sorted(set(variants)) == ["fp32 1x3x32x32", "fp32 1x4", "fp32 8x4",
                                     "int8-dynamic 1x3x32x32"]
    assert variants.count("int8-dynamic 1x3x32x32") == 3
    assert kernel.graph_hash[:10] not in page.column("local", "graph")
    assert page.column("local kernels", "graph") == [kernel.graph_hash[:10]]
    assert "8 subnet or file variants and 1 calibration kernel on 1 device (local)" in text
    assert "Median latency of each subnet measured (8 drawn)" in text
    assert "local: 1 older measurement of the variants shown is in the cache" in text
    assert "1 devices" not in text

    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed")
    url = (out / "index.html").as_uri()
    for query in ("", "?more"):  # the main columns, and every column
        rendered = Page(chromium(tmp_path, url + query, "--dump-dom", "--window-size=1280,3000"))
        assert rendered.body.get("data-images") == "ok"
        assert int(rendered.body["data-page-width"]) <= 1280, query
        if not query:  # every table fits without scrolling sideways
            assert rendered.body.get("data-wide-tables") == "0"
        assert ("more" in rendered.body.get("class", "")) == (query == "?more")
    shot = tmp_path / "mixed.png"
    chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,3000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    kept = os.environ.get("HARNESS_REPORT_SCREENSHOT")
    if kept:
        shutil.copy(shot, kept)
