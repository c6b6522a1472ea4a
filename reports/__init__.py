"""Rendering of run records into tables (and later plots). Reads records only; never imports torch."""
