"""llmfleet.verify: check a live vLLM OpenAI-compatible endpoint against a plan's targets.

Runs on the control node and on the target hosts themselves, with the host's bare Python
(>= 3.11): the package uses the standard library only (``rich`` is used when importable) and
imports nothing else of llmfleet. Entry points: ``python -m llmfleet.verify`` and ``tools/verify.py``.

Modules: ``httpclient`` (HTTP/1.1 on asyncio streams), ``sse``, ``client`` (the requests and
what their answers mean), ``prometheus`` (text format), ``metrics`` (per-request results and figure
definitions), ``prompts`` (exact token counts), ``config`` (plan instance → what to check), ``keys``
(the API key), ``checks``, ``runner`` (the steps), ``results`` (what a run found), ``history`` (the
last good run), ``report`` (JSON envelope, tables), ``textfile`` (node_exporter), ``plot`` (HTML
with inline SVG), ``cli``.
"""
