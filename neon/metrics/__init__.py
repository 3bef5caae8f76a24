"""Metrics: feature statistics, Fréchet distance and reference-statistics files."""
