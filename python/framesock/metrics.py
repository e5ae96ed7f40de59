"""A server's counters in the Prometheus text format (version 0.0.4), and a collector for
``prometheus_client``.

``text(server)`` gives what the health endpoint's ``GET /metrics`` serves: every counter of
``stats()`` as a counter, the gauges of now, and the histogram of the time from a request's
last byte to its reply's first byte written. Under workers the supervisor renders the sum over
its workers (those that exited included) and, per worker slot, the same counters and gauges
as ``framesock_worker_*`` families with a ``worker`` label: summed and per-worker series live
in different families, so that ``sum()`` over a family never counts a request twice.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Protocol

__all__ = ["Collector", "render", "text"]

# (stats key, metric name, type, help). Counters end in _total, as Prometheus names them.
FAMILIES = (
    ("connections_accepted", "connections_accepted_total", "counter", "Connections accepted."),
    ("connections_empty", "connections_empty_total", "counter", "Connections that ended before their first byte (health checks, port probes)."),
    ("requests", "requests_total", "counter", "Requests received whole."),
    ("bytes_in", "received_bytes_total", "counter", "Bytes received."),
    ("bytes_out", "sent_bytes_total", "counter", "Reply bytes sent."),
    ("idle_closed", "idle_closed_total", "counter", "Kept connections closed after idle_timeout."),
    ("idle_evicted", "idle_evicted_total", "counter", "Idle connections closed to make room at max_connections."),
    ("stalled_evicted", "stalled_evicted_total", "counter", "Connections stuck inside a request closed to make room."),
    ("address_refused", "address_refused_total", "counter", "Connections refused for max_connections_per_address."),
    ("busy", "busy_total", "counter", "Requests refused because max_buffered was reached."),
    ("connections_active", "connections_active", "gauge", "Connections open now."),
    ("bytes_buffered", "request_bytes_buffered", "gauge", "Request bytes held now (partly received or being answered)."),
    ("handler_calls_running", "handler_calls_running", "gauge", "Handler calls running now."),
    ("handler_calls_waiting", "handler_calls_waiting", "gauge", "Handler calls waiting for a handler thread now."),
)  # fmt: skip
ERRORS = ("errors_total", "counter", "Failed exchanges and connections, by kind.")
DURATION = ("request_duration_seconds", "Seconds from a request's last byte to its reply's first byte written.")
PREFIX = "framesock_"


class HasStats(Protocol):
    def stats(self) -> Any: ...


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(int(value))


def _with_derived(stats: Mapping[str, Any]) -> dict[str, Any]:
    """``stats`` plus ``handler_calls_running``: calls in progress less those still waiting."""
    derived = dict(stats)
    in_progress = int(stats.get("requests_in_progress", 0))
    waiting = int(stats.get("handler_calls_waiting", 0))
    derived["handler_calls_running"] = max(0, in_progress - waiting)
    return derived


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(stats: Mapping[str, Any], per_worker: Optional[Mapping[str, Mapping[str, Any]]] = None, *, workers: Optional[int] = None) -> str:
    """The text of ``stats`` (a ``Server.stats()`` dict, or a sum of them), and of
    ``per_worker`` (``{worker label: stats}``) when given; ``workers``: how many serve now."""
    total = _with_derived(stats)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")

    for key, name, kind, help_text in FAMILIES:
        family(name, kind, help_text)
        lines.append(f"{PREFIX}{name} {_number(total.get(key, 0))}")
    name, kind, help_text = ERRORS
    family(name, kind, help_text)
    for error_kind, count in sorted(dict(total.get("errors", {})).items()):
        lines.append(f'{PREFIX}{name}{{kind="{_label(error_kind)}"}} {_number(count)}')
    name, help_text = DURATION
    family(name, "histogram", help_text)
    histogram = dict(total.get("request_duration_seconds") or {})
    for bound, count in dict(histogram.get("buckets", {})).items():
        lines.append(f'{PREFIX}{name}_bucket{{le="{bound}"}} {_number(count)}')
    lines.append(f"{PREFIX}{name}_sum {_number(float(histogram.get('sum', 0.0)))}")
    lines.append(f"{PREFIX}{name}_count {_number(histogram.get('count', 0))}")
    if workers is not None:
        family("workers", "gauge", "Worker processes running now.")
        lines.append(f"{PREFIX}workers {workers}")
    if per_worker:
        each = {label: _with_derived(stats) for label, stats in per_worker.items()}
        for key, name, kind, help_text in FAMILIES:
            family(f"worker_{name}", kind, f"Per worker slot: {help_text[0].lower()}{help_text[1:]}")
            for label, stats in each.items():
                lines.append(f'{PREFIX}worker_{name}{{worker="{_label(label)}"}} {_number(stats.get(key, 0))}')
        name, kind, help_text = ERRORS
        family(f"worker_{name}", kind, f"Per worker slot: {help_text[0].lower()}{help_text[1:]}")
        for label, stats in each.items():
            for error_kind, count in sorted(dict(stats.get("errors", {})).items()):
                lines.append(f'{PREFIX}worker_{name}{{worker="{_label(label)}",kind="{_label(error_kind)}"}} {_number(count)}')
    return "\n".join(lines) + "\n"


def text(server: HasStats) -> str:
    """The Prometheus text of a ``Server`` or ``aio.Server`` now (what ``GET /metrics`` serves)."""
    return render(server.stats())


class Collector:
    """A ``prometheus_client`` collector for a server in this process::

        from prometheus_client import REGISTRY
        REGISTRY.register(framesock.metrics.Collector(server))

    ``prometheus_client`` is imported only when this is collected.
    """

    def __init__(self, server: HasStats) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(text(self.server))
