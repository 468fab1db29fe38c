"""Reading the Grafana dashboard: its panels, their PromQL (parsed by a real PromQL parser), the metric
names and labels each query refers to, and those names looked up in a Prometheus text scrape."""

import json
import re

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "switchyard.json"
# Labels Prometheus adds at scrape time (not in /metrics).
TARGET_LABELS = {"instance", "job", "pod", "namespace", "service", "endpoint", "container"}
# What Grafana puts in place of its variables before the query reaches Prometheus.
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "${deployment}": ".*", "$deployment": ".*"}


def load():
    return json.loads(DASHBOARD.read_text())


def panels(dashboard):
    """Every panel, rows' collapsed children included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard):
    """(panel title, refId, expr) of every query."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target.get("refId"), target.get("expr")


def substitute(expr):
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr}"
    return expr


class References:
    """Metric selectors and grouping labels of one parsed expression."""

    def __init__(self, expr):
        self.selectors = []   # (metric name, [label names matched])
        self.groupings = []   # (labels, [metric names below them])
        self._walk(promql_parser.parse(substitute(expr)))

    @property
    def names(self):
        return {name for name, _ in self.selectors}

    def _walk(self, node):
        start = len(self.selectors)
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {node}"
            self.selectors.append((node.name, [m.name for m in node.matchers.matchers]))
        elif isinstance(node, promql_parser.MatrixSelector):
            self._walk(node.vector_selector)
        elif isinstance(node, promql_parser.AggregateExpr):
            self._walk(node.expr)
            if node.param is not None:
                self._walk(node.param)
            if node.modifier is not None:
                self.groupings.append((list(node.modifier.labels), [n for n, _ in self.selectors[start:]]))
        elif isinstance(node, promql_parser.BinaryExpr):
            self._walk(node.lhs)
            self._walk(node.rhs)
            matching = node.modifier.matching if node.modifier is not None else None
            if matching is not None:
                self.groupings.append((list(matching.labels), [n for n, _ in self.selectors[start:]]))
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                self._walk(arg)
        elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
            self._walk(node.expr)
        elif isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
            pass
        else:
            raise AssertionError(f"unexpected PromQL node {type(node).__name__}: {node}")


class Scrape:
    """A /metrics text, by metric family and by sample name."""

    def __init__(self, text):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {}   # sample name -> set of label names seen
        for family in self.families.values():
            for sample in family.samples:
                self.samples.setdefault(sample.name, set()).update(sample.labels)

    def family_of(self, name):
        """The family a sample name belongs to: a gauge as it is, a counter without `_total`, a
        histogram's `_bucket`/`_sum`/`_count` without the suffix — only where the family has that type,
        so `foo_count` is not mistaken for a histogram's count unless `foo` is one."""
        family = self.families.get(name)
        if family is not None and family.type in ("gauge", "untyped", "unknown"):
            return family
        if name.endswith("_total"):
            family = self.families.get(name[: -len("_total")])
            if family is not None and family.type == "counter":
                return family
        for suffix, types in (("_bucket", {"histogram"}), ("_sum", {"histogram", "summary"}),
                              ("_count", {"histogram", "summary"})):
            if name.endswith(suffix):
                family = self.families.get(name[: -len(suffix)])
                if family is not None and family.type in types:
                    return family
        return None

    def missing(self, name):
        """Why `name` is not a series of this scrape, or None if it is."""
        family = self.family_of(name)
        if family is None:
            return "no metric family of that name and type"
        if name not in self.samples:
            return f"family {family.name} ({family.type}) has no sample named {name}"
        return None

    def labels(self, name):
        return self.samples.get(name, set())
