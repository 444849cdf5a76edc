"""llmfleet: declarative, reproducible vLLM deployments for edge GPU fleets.

Keep this file free of imports: llmfleet.verify runs on hosts with a bare Python.
"""

__version__ = "0.1.0"
