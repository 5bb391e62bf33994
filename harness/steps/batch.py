"""Steps 3 to 5 of a profiler for a batch of samples: export ahead of the devices, skip
what is answered already, measure the rest on the pool, store each answer as it comes.

`answer_all` runs them with the steps an `Answering` provides; `ArchitectureBatch` keeps
the books, so that each distinct architecture (graph hash) is measured once however many
samples share it: the first sample of an architecture is measured, the others ("twins")
wait for its answer and get it as a cached copy, and a failure fails them all. Samples
arrive from the pool's export thread and answers from its devices, so every call takes the
batch's lock. An answer is a Measurement
or a Decision (harness.store.decisions): anything with `with_source`.
"""
import threading
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from tqdm import tqdm

from devices.agent_result import AgentResult
from harness.pool.device_pool import AnsweredMeanwhile, DevicePool, MeasureRequest
from harness.export.graph import ExportedModel
from harness.spaces.space import Sample


class Answered(Protocol):
    def with_source(self, source: str) -> Any:
        """The same answer, from another source ("cached" for a twin's copy)."""


class Answering(Protocol):
    """The three steps a batch takes for each sample, provided by whoever answers (the
    profiler's measurement steps, or a decision round)."""

    def export(self, sample: Sample) -> ExportedModel:
        """Step 3: the sample's model, exported (and indexed)."""

    def cached(self, graph: str) -> Optional[Answered]:
        """Step 4: the stored answer for a graph on this device, if any."""

    def store(self, result: AgentResult, exported: ExportedModel) -> Answered:
        """Step 5's end: the device's result as an answer, stored."""


Answer = Any  # an Answered, or the Exception a sample failed with


def answer_all(samples: Sequence[Sample], results: List[Optional[Any]], steps: Answering, *,
               pool: DevicePool, request: MeasureRequest, what: str,
               progress: Optional[bool]) -> None:
    """Fill every None of `results`: `steps.export` each sample (in the pool's export
    thread, ahead of the devices), take what `steps.cached` has for its graph, let the pool
    measure the rest under `request`, and `steps.store` each result as it comes. The first
    failure is raised once every other sample is answered."""
    if all(result is not None for result in results):
        return  # all answered already: no export, no pool, no progress bar
    request = replace(request, still_needed=lambda graph: steps.cached(graph) is None)
    with ArchitectureBatch(results, what, progress) as batch:

        for outcome in pool.measure_many(pending_exports(samples, batch, steps), request):
            try:
                answer: Answer = steps.store(outcome.unwrap(), outcome.exported)
            except AnsweredMeanwhile as exc:  # measured elsewhere while this job waited
                answer = steps.cached(outcome.exported.graph_hash) or exc
            except Exception as exc:
                answer = exc
            batch.answer(outcome.exported.graph_hash, answer)
    batch.raise_first_error()


def pending_exports(samples: Sequence[Sample], batch: "ArchitectureBatch", steps: Answering
                    ) -> Iterator[Tuple[int, ExportedModel]]:
    """Each pending sample exported and looked up; (its index, its model) where it is the
    one of its architecture to measure (a broken subnet fails alone)."""
    for index in batch.pending():
        try:
            exported = steps.export(samples[index])
            answered = steps.cached(exported.graph_hash)
        except Exception as exc:
            batch.fail(index, exc)
            continue
        if batch.needs_measuring(index, exported.graph_hash, answered):
            yield index, exported


class ArchitectureBatch:
    """`results` (in input order; None where not yet answered) filled as answers come, with
    a progress bar (shown on a terminal unless `progress` is False) while it is open."""

    def __init__(self, results: List[Optional[Any]], what: str,
                 progress: Optional[bool] = None):
        self.results = results
        self.errors: Dict[int, Exception] = {}
        self._bar = tqdm(total=len(results), initial=sum(r is not None for r in results),
                         desc=what, unit="subnet", leave=False,
                         disable=(not progress) if progress is not None else None)
        self._progress: Callable[[int], object] = self._bar.update
        self._waiting: Dict[str, List[int]] = {}  # graph hash -> samples waiting for it
        self._done: Dict[str, Answer] = {}        # graph hash -> its answer
        self._lock = threading.Lock()

    def __enter__(self) -> "ArchitectureBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def pending(self) -> List[int]:
        """The samples not answered yet."""
        return [index for index, result in enumerate(self.results) if result is None]

    def fail(self, index: int, error: Exception) -> None:
        """One sample failed alone (say, its subnet would not export)."""
        with self._lock:
            self.errors[index] = error
        self._progress(1)

    def needs_measuring(self, index: int, graph: str, cached: Optional[Answered]) -> bool:
        """Whether sample `index` of architecture `graph` is the one to measure: False when
        the architecture is answered already (`cached`, or a twin's answer) or being
        measured for a twin."""
        with self._lock:
            if cached is not None:
                self._done.setdefault(graph, cached)
            if graph in self._done:
                self._answer(index, self._done[graph], first=False)
                return False
            if graph in self._waiting:
                self._waiting[graph].append(index)
                return False
            self._waiting[graph] = [index]
            return True

    def answer(self, graph: str, answer: Answer) -> None:
        """The architecture's answer, for every sample waiting for it."""
        with self._lock:
            self._done[graph] = answer
            for position, index in enumerate(self._waiting.pop(graph, [])):
                self._answer(index, answer, first=position == 0)

    def raise_first_error(self) -> None:
        if self.errors:
            raise self.errors[min(self.errors)]

    def _answer(self, index: int, answer: Answer, first: bool) -> None:
        if isinstance(answer, Exception):
            self.errors[index] = answer
        else:
            self.results[index] = answer if first else answer.with_source("cached")
        self._progress(1)
