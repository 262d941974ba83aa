"""sidelink's Prometheus exposition, read the way a scraper reads it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.server import Server


class Scrape:
    """The exposition at one moment: every sample as (name, labels, value)."""

    def __init__(self, exposition: str) -> None:
        self.text = exposition
        self.samples = [
            (s.name, s.labels, float(s.value))
            for family in text_string_to_metric_families(exposition)
            for s in family.samples
        ]

    @classmethod
    def of(cls, source: Server | Metrics) -> Scrape:
        """What /metrics would answer now (in the text format)."""
        metrics = source.metrics if isinstance(source, Server) else source
        body, _ = metrics.render(None)
        return cls(body.decode())

    def matching(self, name: str, **labels: str) -> list[float]:
        return [
            v
            for n, lbl, v in self.samples
            if n == name and all(lbl.get(k) == want for k, want in labels.items())
        ]

    def get(self, name: str, **labels: str) -> float:
        """The sum of the matching samples (0 when none exists yet)."""
        return sum(self.matching(name, **labels))

    def first(self, name: str, **labels: str) -> float | None:
        """The first matching sample, or None."""
        found = self.matching(name, **labels)
        return found[0] if found else None


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the exposition; fails when there is none."""
    scrape = Scrape.of(server)
    value = scrape.first(name, **labels)
    if value is None:
        raise AssertionError(f"no sample {name}{labels} in\n{scrape.text}")
    return value
