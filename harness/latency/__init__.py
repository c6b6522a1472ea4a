"""Latency measurement: timed prefill, handoff and decode steps, and real KV transfer between processes."""
