"""The PD engine: plans, model shapes, caches, the staged prefill -> handoff -> decode run, KV policies."""
