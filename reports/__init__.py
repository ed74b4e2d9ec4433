"""Timings into tables, PNG curves and one HTML page per run."""
