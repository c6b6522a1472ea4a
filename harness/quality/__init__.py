"""Quality measurement: the lm-eval model, scoring, lm-eval tasks on local data, long-context tasks, calibration."""
