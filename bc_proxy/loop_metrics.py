"""Counter and histogram families of the hot paths: plain numbers, updated without a lock.

prometheus-client's children update under a threading lock, through several calls: about
4,500 instructions an `inc` and 8,500 an `observe` (callgrind, 0.26), and a legacy send makes
five updates. These families keep a float per series (a count per bucket), updated only on
the event loop's thread, where every request, webhook and upstream call is counted and where
the /metrics handler reads them. At a scrape they are rendered through prometheus-client's
metric families, so the exposition is the text its own Counter and Histogram give
(tests/test_metrics.py compares the two). Owns nothing but those numbers and their rendering.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import INF, floatToGoString


class CounterChild:
    """One series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramChild:
    """One series of a histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is at least `amount` (prometheus-client: amount <= bound;
        # NaN is in no bucket there, and only in the sum here too).
        if amount == amount:  # (not NaN)
            self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


Child = TypeVar("Child", CounterChild, HistogramChild)
_ASKED_MAX = 4096  # spellings of label values remembered per family (series are bounded)


class _Family(Collector, Generic[Child]):
    """Series by label values, registered as one collector."""

    def __init__(
        self, name: str, documentation: str, labelnames: Iterable[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        # The same series by the values as callers pass them, when every value is a str: the
        # hot paths ask with the same strings every time, and find their series in one lookup.
        # (Only strings: 1, True and 1.0 are one dict key, but three series by their text.)
        self._asked: dict[tuple[object, ...], Child] = {}
        registry.register(self)

    def labels(self, *values: object, **named: object) -> Child:
        """The series of these label values (positional, or all by name), created at 0."""
        if not named:
            try:
                child = self._asked.get(values)
            except TypeError:  # an unhashable value: asked by its text below
                child = None
            if child is not None:
                return child
        elif values or set(named) != set(self.labelnames):
            raise ValueError(f"{self.name}: incorrect label names")
        else:
            values = tuple(named[n] for n in self.labelnames)
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: incorrect label count")
            child = self._children[key] = self._child()
        if not named and len(self._asked) < _ASKED_MAX and all(type(v) is str for v in values):
            self._asked[values] = child
        return child

    def _child(self) -> Child:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [self._family()]


class LoopCounter(_Family[CounterChild]):
    """A counter family (`labels(...).inc()`, as prometheus-client's Counter)."""

    def _child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value)
        return [family]


class LoopHistogram(_Family[HistogramChild]):
    """A histogram family (`labels(...).observe()`, as prometheus-client's Histogram)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in sorted order")
        if bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = tuple(bounds)
        self._le = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            cumulative = []
            total = 0.0
            for le, count in zip(self._le, list(child.counts), strict=True):
                total += count
                cumulative.append((le, total))
            family.add_metric(key, cumulative, child.sum)
        return [family]
