"""Per-request results and the figures of a load run, defined once and as vLLM defines them.

Definitions (vLLM ``benchmarks/lib/endpoint_request_func.py`` and ``benchmarks/serve.py``,
``calculate_metrics``), all times from :func:`time.perf_counter`, in seconds:

* **sent**: just before the request is handed to the connection (opening it, if needed, counts).
* **content chunk**: a streamed event whose ``choices`` is non-empty (its text may be empty, e.g.
  a special token). The final ``usage`` event has ``choices: []`` and is not one. A chunk may
  carry several tokens, so **token counts come only from the final ``usage`` event**.
* **TTFT** (time to first token) = first content chunk − sent.
* **ITL** (inter-token latency) = the gaps between consecutive content chunks of a request; the
  ITL distribution pools the gaps of every successful request.
* **E2EL** (end-to-end latency) = ``latency`` = last content chunk − sent.
* **TPOT** (time per output token) = (latency − TTFT) ÷ (output tokens − 1), for requests with
  more than one output token.
* **output tokens/s** = Σ output tokens of successful requests ÷ wall time of the load phase
  (first request sent → last request finished). **requests/s** = successful requests ÷ the same.
* **percentiles**: p50, p90, p95 (the target's) and p99, by linear interpolation between closest
  ranks (numpy's default, as vLLM uses).
* **decode tokens/s per sequence** = 1 ÷ TPOT p50 (what one stream sees once decoding).

A request *failed* when it has an ``error`` (transport error, timeout, non-200, broken or malformed
stream, no usage): it counts in no latency figure. Of those, the ones the server *refused* (it
answered HTTP 4xx: too long, too many, unauthorized) are also counted on their own. A request is *cut short* when it succeeded but
produced fewer tokens than asked (``finish_reason`` "length" early, or any other early end); it
counts in the figures, like vLLM, and is reported separately. Nothing is ever dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: percentiles reported for every latency distribution
PERCENTILES = (50.0, 90.0, 95.0, 99.0)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One load request (cf. vLLM ``RequestFuncOutput``)."""

    requested_output_tokens: int
    ttft: float | None = None
    itl: tuple[float, ...] = ()
    latency: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int | None = None  # the HTTP status when the server answered with an error

    @property
    def refused(self) -> bool:
        """The server answered the request with a client error (HTTP 4xx: too long, too many, ...)."""
        return self.error is not None and self.status is not None and 400 <= self.status < 500

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def cut_short(self) -> bool:
        return self.error is None and (self.output_tokens or 0) < self.requested_output_tokens

    @property
    def tpot(self) -> float | None:
        if self.error is not None or self.ttft is None or self.latency is None:
            return None
        if self.output_tokens is None or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation between closest ranks (numpy 'linear')."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    frac = rank - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


@dataclass(frozen=True, slots=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution | None:
        ordered = sorted(values)
        if not ordered:
            return None
        return cls(
            count=len(ordered),
            mean=math.fsum(ordered) / len(ordered),
            p50=percentile(ordered, 50.0),
            p90=percentile(ordered, 90.0),
            p95=percentile(ordered, 95.0),
            p99=percentile(ordered, 99.0),
            max=ordered[-1],
        )

    def as_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "p50": self.p50, "p90": self.p90, "p95": self.p95, "p99": self.p99, "max": self.max}


@dataclass(frozen=True, slots=True)
class LoadSummary:
    planned: int  # requests the load was to send
    sent: int
    succeeded: int  # no error (cut-short ones included)
    failed: int  # an error, refusals included
    cut_short: int
    not_sent: int  # left unsent because a failure stopped the load
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2el: Distribution | None
    refused: int = 0  # of the failed: the server answered HTTP 4xx

    @property
    def complete(self) -> int:
        return self.succeeded - self.cut_short

    def as_dict(self) -> dict[str, Any]:
        """The figures as the JSON envelope's ``load`` carries them (distributions in seconds)."""
        return {
            "sent": self.sent,
            "succeeded": self.succeeded,
            "complete": self.complete,
            "failed": self.failed,
            "refused": self.refused,
            "cut_short": self.cut_short,
            "not_sent": self.not_sent,
            "duration_s": self.duration_s,
            "output_tokens_total": self.output_tokens,
            "prompt_tokens_total": self.prompt_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_s": None if self.ttft is None else self.ttft.as_dict(),
            "tpot_s": None if self.tpot is None else self.tpot.as_dict(),
            "itl_s": None if self.itl is None else self.itl.as_dict(),
            "e2el_s": None if self.e2el is None else self.e2el.as_dict(),
        }


def summarize(results: Sequence[RequestResult | None], duration_s: float) -> LoadSummary:
    """Figures of a load run; ``None`` marks a request that was never sent."""
    sent = [r for r in results if r is not None]
    ok = [r for r in sent if r.succeeded]
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return LoadSummary(
        planned=len(results),
        sent=len(sent),
        succeeded=len(ok),
        failed=len(sent) - len(ok),
        cut_short=sum(1 for r in ok if r.cut_short),
        not_sent=len(results) - len(sent),
        duration_s=duration_s,
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        output_tokens_per_s=rate(output_tokens),
        requests_per_s=rate(len(ok)),
        ttft=Distribution.of(r.ttft for r in ok if r.ttft is not None),
        tpot=Distribution.of(t for r in ok if (t := r.tpot) is not None),
        itl=Distribution.of(gap for r in ok for gap in r.itl),
        e2el=Distribution.of(r.latency for r in ok if r.latency is not None),
        refused=sum(1 for r in sent if r.refused),
    )
