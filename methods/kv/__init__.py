"""KV-cache baselines: a method's layer plan with a token-selection KV policy at the handoff."""
