"""Reports of benchmark results: pandas tables, matplotlib PNGs and one HTML page, rendered from the results
files alone (`nsa report DIR`)."""

from nsa.reports.render import render_report

__all__ = ["render_report"]
