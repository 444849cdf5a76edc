"""A tiny parser of the Prometheus text exposition format (0.0.4, and OpenMetrics' extras).

Enough for vLLM's ``/metrics``: ``# HELP``/``# TYPE`` lines, samples with labels (values escape
``\\\\``, ``\\"`` and ``\\n``), ``NaN``/``±Inf``, optional timestamps, exemplars and ``# EOF``.
Histograms are read back from their ``_bucket``/``_sum``/``_count`` series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class PromParseError(ValueError):
    """The text is not a valid exposition; ``str()`` names the line."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float

    def matches(self, match: Mapping[str, str] | None) -> bool:
        """True when every label of ``match`` is absent from the sample or equal."""
        return not match or all(self.labels.get(k, v) == v for k, v in match.items())


@dataclass(frozen=True, slots=True)
class Histogram:
    buckets: tuple[tuple[float, float], ...]  # (upper bound "le", cumulative count), ascending
    sum: float
    count: float

    def __sub__(self, before: Histogram) -> Histogram:
        """The observations between two scrapes (counters only go up unless the server restarted)."""
        prior = dict(before.buckets)
        return Histogram(tuple((le, n - prior.get(le, 0.0)) for le, n in self.buckets), self.sum - before.sum, self.count - before.count)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Estimate like PromQL ``histogram_quantile`` (linear within the bucket), q in 0–1."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        prev_le, prev_n = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return prev_le
                if n == prev_n:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
            prev_le, prev_n = le, n
        return prev_le


@dataclass(frozen=True, slots=True)
class Exposition:
    samples: tuple[Sample, ...]
    types: Mapping[str, str]  # family name → counter, gauge, histogram, ...

    def select(self, name: str, match: Mapping[str, str] | None = None) -> list[Sample]:
        return [s for s in self.samples if s.name == name and s.matches(match)]

    def total(self, name: str, match: Mapping[str, str] | None = None) -> float | None:
        """Sum of the matching series (e.g. over engines); None when there is none."""
        found = self.select(name, match)
        return math.fsum(s.value for s in found) if found else None

    def histogram(self, name: str, match: Mapping[str, str] | None = None) -> Histogram | None:
        """The histogram family ``name``, summed over the matching series."""
        counts: dict[float, float] = {}
        for s in self.select(f"{name}_bucket", match):
            try:
                le = _parse_value(s.labels.get("le", ""))
            except ValueError:
                continue
            counts[le] = counts.get(le, 0.0) + s.value
        total_sum = self.total(f"{name}_sum", match)
        total_count = self.total(f"{name}_count", match)
        if not counts or total_sum is None or total_count is None:
            return None
        return Histogram(tuple(sorted(counts.items())), total_sum, total_count)


def _parse_value(text: str) -> float:
    t = text.strip()
    low = t.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    if not t or "_" in t or low.lstrip("+-").startswith(("inf", "nan", "infinity")):
        raise ValueError(text)
    return float(t)


def _parse_labels(line: str, i: int, lineno: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at ``line[i] == "{"``; return labels and the index after ``}``."""
    labels: dict[str, str] = {}
    n = len(line)
    i += 1
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == "}":
            return labels, i + 1
        m = _LABEL_RE.match(line, i)
        if not m:
            raise PromParseError(f"line {lineno}: invalid label name at column {i + 1}")
        key = m.group()
        i = m.end()
        while i < n and line[i] in " \t":
            i += 1
        if i >= n or line[i] != "=":
            raise PromParseError(f"line {lineno}: expected '=' after label {key!r}")
        i += 1
        while i < n and line[i] in " \t":
            i += 1
        if i >= n or line[i] != '"':
            raise PromParseError(f"line {lineno}: label {key!r} value is not quoted")
        i += 1
        out: list[str] = []
        while True:
            if i >= n:
                raise PromParseError(f"line {lineno}: unterminated value of label {key!r}")
            c = line[i]
            if c == "\\":
                if i + 1 >= n or line[i + 1] not in _ESCAPES:
                    raise PromParseError(f"line {lineno}: invalid escape in label {key!r}")
                out.append(_ESCAPES[line[i + 1]])
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                out.append(c)
                i += 1
        if key in labels:
            raise PromParseError(f"line {lineno}: label {key!r} repeated")
        labels[key] = "".join(out)
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == ",":
            i += 1
        elif i < n and line[i] == "}":
            return labels, i + 1
        else:
            raise PromParseError(f"line {lineno}: expected ',' or '}}' after label {key!r}")


def parse(text: str) -> Exposition:
    """Parse an exposition; raise :class:`PromParseError` naming the first bad line."""
    samples: list[Sample] = []
    types: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].split(None, 3)
            if len(parts) >= 3 and parts[0] == "TYPE":
                types[parts[1]] = parts[2]
            elif parts[:1] == ["EOF"]:
                break
            continue
        m = _NAME_RE.match(line)
        if not m:
            raise PromParseError(f"line {lineno}: invalid metric name")
        name = m.group()
        i = m.end()
        labels: dict[str, str] = {}
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i, lineno)
        rest = line[i:]
        if rest and rest[0] not in " \t":
            raise PromParseError(f"line {lineno}: expected a space after {name}")
        rest = rest.split(" # ", 1)[0]  # OpenMetrics exemplar
        fields = rest.split()
        if not 1 <= len(fields) <= 2:
            raise PromParseError(f"line {lineno}: expected 'value [timestamp]' after {name}")
        try:
            value = _parse_value(fields[0])
            if len(fields) == 2:
                float(fields[1])
        except ValueError:
            raise PromParseError(f"line {lineno}: invalid value {rest.strip()[:40]!r} of {name}") from None
        samples.append(Sample(name, labels, value))
    return Exposition(tuple(samples), types)


@dataclass(frozen=True, slots=True)
class KvCacheCapacity:
    tokens: int
    blocks: int | None
    block_size: int | None
    source: str  # which labels the figure came from
    series: int  # how many cache_config_info series (engines) there were; tokens is their minimum


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    try:
        v = int(labels[key])
    except (KeyError, ValueError):
        return None
    return v if v >= 0 else None


def kv_cache_capacity(expo: Exposition, match: Mapping[str, str] | None = None) -> KvCacheCapacity | None:
    """KV-cache capacity in tokens from the labels of ``vllm:cache_config_info``.

    ``kv_cache_size_tokens`` where newer vLLM publishes it, else ``num_gpu_blocks × block_size``
    (the device's KV blocks; the CPU build counts its KV blocks there too), else
    ``num_cpu_blocks × block_size``. With several engines, the smallest.
    """
    found: list[KvCacheCapacity] = []
    series = expo.select("vllm:cache_config_info", match)
    for s in series:
        lb = s.labels
        block_size = _int_label(lb, "block_size")
        tokens = _int_label(lb, "kv_cache_size_tokens")
        if tokens is not None:
            found.append(KvCacheCapacity(tokens, _int_label(lb, "num_gpu_blocks"), block_size, "kv_cache_size_tokens", 0))
            continue
        if block_size is None:
            continue
        for key in ("num_gpu_blocks", "num_cpu_blocks"):
            blocks = _int_label(lb, key)
            if blocks:
                found.append(KvCacheCapacity(blocks * block_size, blocks, block_size, f"{key} × block_size", 0))
                break
    if not found:
        return None
    least = min(found, key=lambda c: c.tokens)
    return KvCacheCapacity(least.tokens, least.blocks, least.block_size, least.source, len(series))
