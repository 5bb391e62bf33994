"""nn-Meter's kernel detector, with the same answers in a fraction of the time.

A search predicts many subnets it never saw, and nn-Meter's detector spent 100-200 ms on
each ProxylessSpace subnet, most of it in two places this module removes:
- it parses its fusion rules and multi-op patterns (JSON, deep copies) on every detection:
  here a `RuleReader` is made once per rules file and shared;
- before its linear fusion pass it looks for every multi-op pattern (SE, hswish, channel
  shuffle, global pooling) by networkx subgraph isomorphism over the whole graph, about ten
  searches per model. Here a pattern is searched only where it can match: not at all when the
  graph lacks the op types it needs, else in the part of the graph made of nodes of its types
  and their neighbours (which its `dummy` input, matching any type, can be). nn-Meter's
  matcher finds node-induced subgraphs, and such a subgraph lies whole in that part with the
  same edges, so the matches are the same ones (tests/test_kernels.py checks the kernels
  against nn-Meter's own detector on several spaces).
It also skips the two deep copies nn-Meter makes of the graph it loads. Everything
else (conversion, the linear fusion pass, the kernels' attributes) is nn-Meter's.
"""
import functools
import os
from collections import Counter
from typing import Any, Dict, List, Tuple

from nn_meter.kernel_detector import KernelDetector
from nn_meter.kernel_detector.rule_reader import RuleReader
from nn_meter.kernel_detector.rule_splitter import RuleSplitter
from nn_meter.kernel_detector.utils.ir_tools import convert_nodes
from nn_meter.kernel_detector.utils.match_helper import MatchHelper
from nn_meter.utils.graph_tool import ModelGraph

ANY_TYPE = "dummy"  # a pattern node that matches a node of any type


def _types(graph: Dict[str, Any]) -> Counter:
    return Counter(node["attr"].get("type") for node in graph.values())


def find_pattern(model_graph: ModelGraph, pattern: ModelGraph,
                 present: Counter) -> List[Dict[str, str]]:
    """nn-Meter's `model_graph.find_subgraphs(pattern, op_type_matcher)`, searched only in the
    part of the graph where the pattern can lie; `present` counts the graph's node types."""
    pattern_types = _types(pattern.get_graph())
    needs_any = pattern_types.pop(ANY_TYPE, 0) > 0
    graph = model_graph.get_graph()
    if any(present[kind] < count for kind, count in pattern_types.items()):
        return []
    part = {name for name, node in graph.items() if node["attr"].get("type") in pattern_types}
    if needs_any:
        part |= {near for name in list(part)
                 for near in graph[name]["inbounds"] + graph[name]["outbounds"]}
    restricted = {name: {"attr": node["attr"],
                         "inbounds": [n for n in node["inbounds"] if n in part],
                         "outbounds": [n for n in node["outbounds"] if n in part]}
                  for name, node in graph.items() if name in part}
    return ModelGraph(graph=restricted).find_subgraphs(pattern, MatchHelper.op_type_matcher)


class _TakenOver(dict):
    """A graph handed to nn-Meter's convert_nodes, which deep-copies what it is given (5 ms
    on a ProxylessSpace subnet): this one is the detector's to change, so it is its own copy."""

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_TakenOver":
        return self


class PatternPrunedSplitter(RuleSplitter):
    """nn-Meter's RuleSplitter with its multi-op pattern search restricted (find_pattern)."""

    def fuse_multiop_blocks(self, model_graph: ModelGraph) -> None:
        present = _types(model_graph.get_graph())
        for kernel_type, patterns in self.rule_reader.fusion_units.items():
            for pattern in patterns:
                matches = find_pattern(model_graph, pattern, present)
                for match in matches:
                    model_graph.fuse(match.keys(), kernel_type)
                if matches:
                    present = _types(model_graph.get_graph())


class FastKernelDetector(KernelDetector):
    """nn-Meter's KernelDetector over a shared rule reader and the pruned splitter."""

    def __init__(self, reader: RuleReader):  # pylint: disable=super-init-not-called
        # KernelDetector.__init__ would parse the rules file again: its fields, set here
        self.reader = reader
        self.splitter = PatternPrunedSplitter(reader)
        self.model_graph: Any = None
        self.bbs: List[List[str]] = []
        self._global_index = 0

    def load_graph(self, graph: Dict[str, Any]) -> None:
        """nn-Meter's load_graph without its two deep copies of the graph: this one takes
        the graph over (it is changed in place; the caller made it for this detection)."""
        model_graph = ModelGraph()
        model_graph.graph = convert_nodes(_TakenOver(graph))
        model_graph.refresh()
        self.model_graph = model_graph
        self.bbs = self.splitter.split(model_graph)


@functools.lru_cache(maxsize=16)
def _rule_reader(fusion_rules: str, version: Tuple[int, int]) -> RuleReader:
    return RuleReader(fusion_rules)


def kernel_detector(fusion_rules: str) -> FastKernelDetector:
    """A fresh detector (it holds the graph it splits) over the parsed rules of the file,
    shared while the file is unchanged (read-only once made)."""
    stat = os.stat(fusion_rules)
    return FastKernelDetector(_rule_reader(fusion_rules, (stat.st_mtime_ns, stat.st_size)))
