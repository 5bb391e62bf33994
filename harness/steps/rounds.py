"""Steps 3-5 for a batch measured in interleaved rounds (the "rounds" protocol).

Where harness.steps.batch measures one model after another, this sends a device its
candidates together: every pending sample is exported and looked up first (each
architecture once, twins answered with its result), the rest is cut into windows that fit
the device's memory, and each window is timed in interleaved rounds beside the reference
model (agents.ort_agent.measure_rounds; harness.store.rounds reads the ratios). A model that
fails is that model's error; a window whose device is lost fails over whole to another device
(nothing of it is stored); when no device is left, DeviceLost reaches the caller, whose
fallback answers what is still open.
"""
from typing import Any, List, Optional, Protocol, Sequence

from devices.errors import AgentProtocolError, DeviceLost
from harness.export.graph import ExportedModel
from harness.pool.device_pool import DevicePool, MeasureRequest
from harness.spaces.space import Sample
from harness.steps.batch import Answering, ArchitectureBatch, pending_exports
from harness.steps.measuring import WINDOW_BUDGET_BYTES, windows


class AnsweringInRounds(Answering, Protocol):
    """A batch's steps (harness.steps.batch.Answering) with their request, the request each
    window is sent under and the reference they are timed beside: the profiler's
    measurement steps, or a decision round."""

    request: MeasureRequest

    def window_request(self, window: Sequence[ExportedModel],
                       budget_bytes: int = WINDOW_BUDGET_BYTES) -> MeasureRequest:
        """The request of the next window, of these candidates, within `budget_bytes` of the
        device's memory (harness.steps.measuring.window_request)."""

    def reference(self) -> ExportedModel:
        """The reference model, exported."""

    def window_budget(self) -> int:
        """The loaded bytes one window may hold on the device
        (harness.steps.measuring.window_budget)."""


def answer_in_rounds(samples: Sequence[Sample], results: List[Optional[Any]],
                     steps: AnsweringInRounds, *, pool: DevicePool, what: str,
                     progress: Optional[bool], budget_bytes: Optional[int] = None) -> None:
    """Fill every None of `results` by windows of interleaved rounds beside `steps`'
    reference, under `steps`' window requests, each window within `budget_bytes` (by
    default the device's window budget) (see the module docstring). The first failure is
    raised once every other sample is answered."""
    if all(result is not None for result in results):
        return
    if budget_bytes is None:
        budget_bytes = steps.window_budget()
    with ArchitectureBatch(results, what, progress) as batch:
        pending = [exported for _, exported in pending_exports(samples, batch, steps)]
        for window in windows(pending, budget_bytes,
                              sessions=steps.request.settings["model_sessions"]):
            try:
                answers = pool.measure_rounds(window, steps.reference(),
                                              steps.window_request(window, budget_bytes))
            except DeviceLost:
                raise
            except Exception as exc:  # the window's own fault (its reference, its request)
                answers = {model.graph_hash: exc for model in window}
            for model in window:
                answer: Any = answers.get(model.graph_hash) or AgentProtocolError(
                    f"the device did not answer for {model.graph_hash[:12]}")
                if not isinstance(answer, Exception):
                    try:
                        answer = steps.store(answer, model)
                    except Exception as exc:
                        answer = exc
                batch.answer(model.graph_hash, answer)
    batch.raise_first_error()
