from __future__ import annotations

import math

import pytest
from llmfleet.verify.prometheus import Histogram, PromParseError, kv_cache_capacity, parse

CACHE_CONFIG_INFO = (
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",cpu_offload_gb="0",'
    'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",is_attention_free="False",num_cpu_blocks="None",'
    'num_gpu_blocks="2731",num_gpu_blocks_override="None",prefix_caching_hash_algo="sha256",sliding_window="None",'
    'swap_space="4",swap_space_bytes="4294967296"} 1.0'
)
VLLM_SAMPLE = r"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 1234.0
vllm:generation_tokens_total{engine="1",model_name="tiny-llama"} 66.0
vllm:generation_tokens_total{engine="0",model_name="other"} 5.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="tiny-llama"} 1.7e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="tiny-llama"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="tiny-llama"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="tiny-llama"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-llama"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-llama"} 4.5
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
{CACHE_CONFIG_INFO}
python_gc_objects_collected_total{generation="0"} 12345.0
odd_values{kind="nan"} NaN
odd_values{kind="pinf"} +Inf
odd_values{kind="ninf"} -Inf
with_timestamp 3.5 1700000000000
""".replace("{CACHE_CONFIG_INFO}", CACHE_CONFIG_INFO)


def test_vllm_exposition() -> None:
    e = parse(VLLM_SAMPLE)
    assert e.types["vllm:generation_tokens_total"] == "counter"
    assert e.types["vllm:time_to_first_token_seconds"] == "histogram"
    # summed over engines, filtered by model
    assert e.total("vllm:generation_tokens_total", {"model_name": "tiny-llama"}) == 1300.0
    assert e.total("vllm:generation_tokens_total") == 1305.0
    assert e.total("vllm:nothing_like_this") is None
    assert e.total("with_timestamp") == 3.5
    values = {s.labels["kind"]: s.value for s in e.select("odd_values")}
    assert math.isnan(values["nan"]) and values["pinf"] == math.inf and values["ninf"] == -math.inf
    h = e.histogram("vllm:time_to_first_token_seconds", {"model_name": "tiny-llama"})
    assert h is not None
    assert h.buckets == ((0.1, 2.0), (0.5, 6.0), (1.0, 9.0), (math.inf, 10.0))
    assert h.count == 10.0 and h.sum == 4.5 and h.mean == 0.45


def test_cache_config_info_to_tokens() -> None:
    cap = kv_cache_capacity(parse(VLLM_SAMPLE), {"model_name": "tiny-llama"})
    assert cap is not None
    assert (cap.tokens, cap.blocks, cap.block_size, cap.source, cap.series) == (2731 * 16, 2731, 16, "num_gpu_blocks × block_size", 1)


def test_cache_config_variants() -> None:
    newer = 'vllm:cache_config_info{block_size="16",kv_cache_size_tokens="43696",num_gpu_blocks="2731"} 1\n'
    cap = kv_cache_capacity(parse(newer))
    assert cap is not None and cap.tokens == 43696 and cap.source == "kv_cache_size_tokens"
    cpu_only = 'vllm:cache_config_info{block_size="128",num_cpu_blocks="64",num_gpu_blocks="None"} 1\n'
    cap = kv_cache_capacity(parse(cpu_only))
    assert cap is not None and cap.tokens == 8192 and cap.source == "num_cpu_blocks × block_size"
    two_engines = (
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1\n'
        'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="90"} 1\n'
    )
    cap = kv_cache_capacity(parse(two_engines))
    assert cap is not None and cap.tokens == 90 * 16 and cap.series == 2  # the smallest engine
    assert kv_cache_capacity(parse('vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1\n')) is None
    assert kv_cache_capacity(parse("up 1\n")) is None


def test_label_escapes_and_spacing() -> None:
    text = 'm{path="C:\\\\dir\\\\x",quote="say \\"hi\\"",nl="a\\nb",brace="}{,=",empty=""} 7\nm2{ a = "1" , b="2", } 8\n'
    e = parse(text)
    s = e.select("m")[0]
    assert s.labels == {"path": "C:\\dir\\x", "quote": 'say "hi"', "nl": "a\nb", "brace": "}{,=", "empty": ""}
    assert s.value == 7.0
    assert e.select("m2")[0].labels == {"a": "1", "b": "2"}


def test_openmetrics_extras() -> None:
    text = 'req_total{code="200"} 3 # {trace_id="abc"} 1.0 1700000000\n# EOF\nignored_after_eof 1\n'
    e = parse(text)
    assert e.total("req_total") == 3.0 and e.select("ignored_after_eof") == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('m{a="1} 2\n', "unterminated"),
        ('m{a="\\q"} 2\n', "invalid escape"),
        ("m{a=1} 2\n", "not quoted"),
        ('m{a="1",a="2"} 2\n', "repeated"),
        ("m twelve\n", "invalid value"),
        ("m 1 2 3\n", "value [timestamp]"),
        ("m\n", "value [timestamp]"),
        ("9m 1\n", "invalid metric name"),
        ('m{a="1"}2\n', "expected a space"),
        ("m 1_000\n", "invalid value"),
    ],
)
def test_parse_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(PromParseError) as exc:
        parse("ok 1\n" + text)
    assert "line 2" in str(exc.value) and fragment in str(exc.value)


def test_histogram_delta_and_quantile() -> None:
    before = Histogram(((0.1, 2.0), (0.5, 6.0), (1.0, 9.0), (math.inf, 10.0)), 4.5, 10.0)
    after = Histogram(((0.1, 2.0), (0.5, 16.0), (1.0, 29.0), (math.inf, 30.0)), 17.5, 30.0)
    d = after - before
    assert d.buckets == ((0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (math.inf, 20.0))
    assert d.count == 20.0 and d.mean == pytest.approx(13.0 / 20)
    # rank 0.5*20 = 10 → the top of bucket (0.1, 0.5]; rank 0.95*20 = 19 → 0.5 + 0.5 * 9/10
    assert d.quantile(0.5) == pytest.approx(0.5)
    assert d.quantile(0.95) == pytest.approx(0.95)
    assert Histogram(((1.0, 0.0), (math.inf, 0.0)), 0.0, 0.0).quantile(0.5) is None
    assert Histogram(((1.0, 0.0), (math.inf, 4.0)), 8.0, 4.0).quantile(0.5) == 1.0  # in +Inf: its lower bound
