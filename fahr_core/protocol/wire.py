"""A site summary <-> the flat scalar metrics that carry it to the server.

Flower metric records hold flat numbers, so the aggregate fields of a site's summary.json are sent as
named scalars and rebuilt at the server. Which fields, under which names, is not written here: it is
read off the result types, whose fields marked ``wire(key)`` (:mod:`fahr_core.survival.results`) are
the ones sent. :data:`FIELDS` is that mapping, generated once at import for both ends.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from fahr_core.report.summary import SiteSummary
from fahr_core.survival.results import FLATTEN, WIRE

NUM_EXAMPLES = "num-examples"  # the held-out n: sent as an int count, like the FedAvg weight of a reply
INTERVAL_PARTS: Mapping[int, str] = {0: "-low", 1: "-high"}


@dataclass(frozen=True)
class WireField:
    """One summary field sent as metrics: ``key`` + each part's suffix <- ``path`` in the summary's JSON.

    ``kind``: "number" (sent as a float), "count" (an int, rebuilt as 0 when absent), "interval" ([low,
    high] as ``key-low``, ``key-high``) or "result" (a result type's ``WIRE_PARTS``, {field: suffix}; the
    part with suffix "" is the value without which the result was not computed).
    """

    key: str
    path: tuple[str, ...]
    kind: Literal["number", "count", "interval", "result"]
    parts: Mapping[Any, str] = field(default_factory=lambda: {None: ""})

    @property
    def keys(self) -> list[str]:
        return [self.key + suffix for suffix in self.parts.values()]

    @property
    def headline(self) -> Any:
        (part,) = [p for p, suffix in self.parts.items() if suffix == ""]
        return part


def _without_none(hint: Any) -> Any:
    """``X`` of ``X | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def wire_fields(cls: type, path: tuple[str, ...] = ()) -> list[WireField]:
    """Every field of result type ``cls`` (and of the results nested in it) marked to go on the wire."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = _without_none(hints[f.name])
        here = path if f.metadata.get(FLATTEN) else (*path, f.name)
        key = f.metadata.get(WIRE)
        if key is None:
            if isinstance(hint, type) and is_dataclass(hint):
                out += wire_fields(hint, here)
        elif typing.get_origin(hint) is tuple:
            out.append(WireField(key, here, "interval", INTERVAL_PARTS))
        elif hasattr(hint, "WIRE_PARTS"):
            out.append(WireField(key, here, "result", hint.WIRE_PARTS))
        elif hint in (int, float):
            out.append(WireField(key, here, "count" if hint is int else "number"))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: a {hint} cannot be sent as scalar metrics")
    return out


FIELDS = wire_fields(SiteSummary)
# the privacy section is the ledger's own account (a mapping, not a result type): its epsilon goes on
EPSILON = "epsilon"
KEYS = frozenset(k for f in FIELDS for k in f.keys) | {EPSILON}


def _get(summary: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path`, or None where any level is missing or None."""
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _put(summary: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    *parents, last = path
    for key in parents:
        summary = summary.setdefault(key, {})
    summary[last] = value


def privacy_metrics(privacy: Mapping[str, Any]) -> dict[str, float | int]:
    """The metrics of an evaluation without statistics: the privacy account only, no patients."""
    out: dict[str, float | int] = {}
    if privacy.get(EPSILON) is not None:
        out[EPSILON] = float(privacy[EPSILON])
    out[NUM_EXAMPLES] = 0
    return out


def summary_to_metrics(summary: SiteSummary | Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers of `summary` (or of its JSON, as in summary.json) that go to the server, where computed."""
    doc = summary.to_json() if isinstance(summary, SiteSummary) else summary
    out = privacy_metrics(doc.get("privacy") or {})
    for f in FIELDS:
        value = _get(doc, f.path)
        if f.kind == "interval":
            if value:
                for i, suffix in f.parts.items():
                    out[f.key + suffix] = float(value[i])
        elif f.kind == "result":
            if (value or {}).get(f.headline) is not None:
                for part, suffix in f.parts.items():
                    if value.get(part) is not None:
                        out[f.key + suffix] = float(value[part])
        elif value is not None:
            # counts go as floats too, as they always have, except the held-out n
            out[f.key] = int(value) if f.key == NUM_EXAMPLES else float(value)
    return out


def metrics_to_summary(site: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the aggregate site summary (its JSON form) that the federation report reads."""
    summary: dict[str, Any] = {"site": site}
    for f in FIELDS:
        if f.kind == "count":
            _put(summary, f.path, int(metrics.get(f.key) or 0))
        elif f.kind == "number":
            _put(summary, f.path, metrics.get(f.key))
        elif f.kind == "interval":
            low, high = (metrics.get(f.key + suffix) for suffix in f.parts.values())
            _put(summary, f.path, [low, high] if low is not None and high is not None else None)
        else:
            parts = {part: metrics.get(f.key + suffix) for part, suffix in f.parts.items()}
            _put(summary, f.path, parts if metrics.get(f.key) is not None else None)
    summary["privacy"] = {EPSILON: metrics.get(EPSILON)}
    return summary
