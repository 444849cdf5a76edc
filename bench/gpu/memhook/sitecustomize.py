"""Records vLLM's own memory accounting, in bytes, from inside the GPU worker (captures only).

Put this folder on PYTHONPATH and set LLMFLEET_MEMHOOK_OUT to a folder: when the worker module
``vllm.v1.worker.gpu_worker`` is imported, ``Worker.determine_available_memory`` and
``Worker.compile_or_warm_up_model`` are wrapped so that, after each returns, the worker's own
figures are written to ``<LLMFLEET_MEMHOOK_OUT>/worker-<pid>.json``: the CUDA total and free memory
at start (``init_snapshot``), the requested memory, weights (``model_memory_usage``), peak
activation, non-torch memory, the CUDA-graph estimate, the KV memory it returned, and after
warm-up the memory CUDA reports in use. The log line "Actual usage is ..." rounds these to
0.01 GiB; the planner is held to bytes. Nothing else of vLLM is changed.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys

_TARGET = "vllm.v1.worker.gpu_worker"


def _record(worker, stage, extra):
    out = os.environ.get("LLMFLEET_MEMHOOK_OUT")
    if not out:
        return
    import torch

    snap = getattr(worker, "init_snapshot", None)
    runner = getattr(worker, "model_runner", None)
    free, total = torch.cuda.mem_get_info()
    data = {
        "stage": stage,
        "init_total_bytes": getattr(snap, "total_memory", None),
        "init_free_bytes": getattr(snap, "free_memory", None),
        "requested_bytes": getattr(worker, "requested_memory", None),
        "weights_bytes": getattr(runner, "model_memory_usage", None),
        "peak_activation_bytes": getattr(worker, "peak_activation_memory", None),
        "non_torch_bytes": getattr(worker, "non_torch_memory", None),
        "cudagraph_estimate_bytes": getattr(worker, "cudagraph_memory_estimate", None),
        "available_kv_cache_bytes": getattr(worker, "available_kv_cache_memory_bytes", None),
        "cuda_free_bytes_now": free,
        "cuda_total_bytes_now": total,
        "torch_allocated_bytes_now": torch.cuda.memory_allocated(),
        "torch_reserved_bytes_now": torch.cuda.memory_reserved(),
    } | extra
    path = os.path.join(out, f"worker-{os.getpid()}.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    old[stage] = data
    with open(path, "w") as f:
        json.dump(old, f, indent=1, default=str)


def _patch(module):
    worker_cls = module.Worker
    determine = worker_cls.determine_available_memory
    warm = worker_cls.compile_or_warm_up_model

    def determine_available_memory(self, *a, **k):
        value = determine(self, *a, **k)
        _record(self, "determine_available_memory", {"returned_bytes": int(value)})
        return value

    def compile_or_warm_up_model(self, *a, **k):
        value = warm(self, *a, **k)
        _record(self, "compile_or_warm_up_model", {"returned": value if isinstance(value, (int, float)) else None})
        return value

    worker_cls.determine_available_memory = determine_available_memory
    worker_cls.compile_or_warm_up_model = compile_or_warm_up_model


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            _patch(module)
        except Exception as exc:  # a hook that fails must not stop the engine
            print(f"memhook: not patched: {exc!r}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if os.environ.get("LLMFLEET_MEMHOOK_OUT"):
    sys.meta_path.insert(0, _Finder())
