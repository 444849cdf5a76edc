from __future__ import annotations

import math
import random

import numpy as np
import pytest
from llmfleet.verify.metrics import Distribution, RequestResult, percentile, summarize


@pytest.mark.parametrize("q", [0, 1, 5, 25, 50, 75, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    rng = random.Random(n * 1000 + int(q * 10))
    values = [rng.expovariate(3.0) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_percentile_by_hand() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; rank = 3q/100
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    r = RequestResult(requested_output_tokens=5, ttft=0.5, itl=(0.1, 0.2, 0.1, 0.2), latency=1.1, output_tokens=5, prompt_tokens=9)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 4)
    assert RequestResult(1, ttft=0.5, latency=0.5, output_tokens=1).tpot is None  # vLLM: no TPOT for one token
    assert RequestResult(5, error="boom").tpot is None


def test_cut_short_and_failed() -> None:
    assert RequestResult(32, ttft=0.1, latency=1.0, output_tokens=20, finish_reason="length").cut_short
    assert not RequestResult(32, ttft=0.1, latency=1.0, output_tokens=32, finish_reason="length").cut_short
    failed = RequestResult(32, error="HTTP 500")
    assert not failed.succeeded and not failed.cut_short


def test_summarize_by_hand() -> None:
    a = RequestResult(4, ttft=0.2, itl=(0.1, 0.1, 0.1), latency=0.5, output_tokens=4, prompt_tokens=10, finish_reason="length")
    b = RequestResult(4, ttft=0.4, itl=(0.3, 0.3, 0.3), latency=1.3, output_tokens=4, prompt_tokens=10, finish_reason="length")
    # cut short: counted in the figures (like vLLM) and reported
    c = RequestResult(4, ttft=0.3, itl=(0.2,), latency=0.5, output_tokens=2, prompt_tokens=10, finish_reason="length")
    d = RequestResult(4, error="stream ended before [DONE]")
    s = summarize([a, b, c, d, None], duration_s=2.0)
    assert (s.planned, s.sent, s.succeeded, s.failed, s.cut_short, s.not_sent, s.complete) == (5, 4, 3, 1, 1, 1, 2)
    assert s.output_tokens == 10 and s.prompt_tokens == 30
    assert s.output_tokens_per_s == pytest.approx(5.0)
    assert s.requests_per_s == pytest.approx(1.5)
    assert s.ttft is not None and s.ttft.mean == pytest.approx(0.3) and s.ttft.p50 == pytest.approx(0.3)
    assert s.ttft.p95 == pytest.approx(0.39)
    # TPOT per request: a (0.5-0.2)/3 = 0.1, b (1.3-0.4)/3 = 0.3, c (0.5-0.3)/1 = 0.2
    assert s.tpot is not None and s.tpot.count == 3 and s.tpot.mean == pytest.approx(0.2)
    # ITL pools every gap of the successful requests
    assert s.itl is not None and s.itl.count == 7 and s.itl.mean == pytest.approx(1.4 / 7) and s.itl.max == pytest.approx(0.3)
    assert s.e2el is not None and s.e2el.p50 == pytest.approx(0.5) and s.e2el.max == pytest.approx(1.3)


def test_summarize_nothing_succeeded() -> None:
    s = summarize([RequestResult(4, error="x"), None], duration_s=0.5)
    assert s.ttft is None and s.itl is None and s.output_tokens_per_s == 0.0 and s.failed == 1 and s.not_sent == 1
    assert summarize([], 0.0).output_tokens_per_s == 0.0


def test_distribution_fields() -> None:
    d = Distribution.of([3.0, 1.0, 2.0])
    assert d is not None
    expected = {"count": 3, "mean": 2.0, "p50": 2.0, "p90": pytest.approx(2.8), "p95": pytest.approx(2.9), "p99": pytest.approx(2.98)}
    assert d.as_dict() == {**expected, "max": 3.0}
    assert Distribution.of([]) is None
    tenths = Distribution.of([0.1] * 10)
    assert tenths is not None and math.isclose(tenths.mean, 0.1)
