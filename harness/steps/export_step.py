"""Step 3 of a profiler: from a validated sample to the model a device runs.

`SampleExport.indexed` finds a sample's graph hash in the cache's sample index (a cached
`profile()` needs neither a freeze nor an export); calling the step freezes, exports and
hashes the sample (harness.export.graph), teaches the index sample -> graph hash, and at
another precision converts the model on the host (keyed by the source's hash and the
precision, so the index serves every variant).
"""
from pathlib import Path
from typing import Optional

from harness.export.graph import (DummyInput, ExportedModel, export_sample, freeze,
                                  input_signature)
from harness.export.model_file import Precision
from harness.spaces.space import ModelSpace, Sample, sample_key
from harness.steps.counters import Counters
from harness.steps.key_scope import KeyScope
from harness.store.cache import Cache


class SampleExport:
    """Export step of one profiler (its space, inputs, precision, cache and scope)."""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, scope: KeyScope,
                 cache: Cache, precision: Precision, home: Path, counters: Counters):
        self.space, self.dummy_input, self.scope = space, dummy_input, scope
        self.cache, self.precision, self.home, self.counters = cache, precision, home, counters
        self.signature = input_signature(dummy_input)  # shapes and dtypes of the inputs
        self.shapes = {f"input{i}": item["shape"] for i, item in enumerate(self.signature)}

    def indexed(self, sample: Sample) -> Optional[str]:
        """The sample's graph hash from the sample index (None if never exported)."""
        return self.cache.lookup_sample(self.scope.space_fingerprint, self.scope.input_sig,
                                        sample_key(sample))

    def __call__(self, sample: Sample) -> ExportedModel:
        """Freeze, export and hash; the index learns sample -> graph hash; converted to the
        profiler's precision and runtime (a conversion freezes the sample again, only when
        $HARNESS_HOME/converted does not hold it)."""
        exported = export_sample(self.space, sample, self.dummy_input, home=self.home)
        self.counters.add(exports=1)
        self.cache.put_sample(self.scope.space_fingerprint, self.scope.input_sig,
                              sample_key(sample), exported.graph_hash)
        converted = self.precision.convert(exported, self.shapes,
                                           lambda: freeze(self.space, sample, self.dummy_input),
                                           self.dummy_input, self.home)
        if converted.convert_ms is not None:  # a new conversion for the runtime (not kept)
            self.counters.add(conversions=1, convert_s=converted.convert_ms / 1e3)
        return converted

