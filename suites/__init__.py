"""Named problem sets (suites) and the implementations they run (providers), shared by the benchmarks, the
correctness gate, the tuner and the tests."""

from nsa.suites.catalog import FLA_CONFIG, PAPER_CONFIG, SUITES, Suite, get_suite
from nsa.suites.problem import OPS, Problem, config_label, make_inputs
from nsa.suites.providers import PROVIDERS, Prepared, Provider, get_providers, register
from nsa.suites import baselines  # noqa: F401  (registers the baseline providers)

__all__ = ["FLA_CONFIG", "PAPER_CONFIG", "SUITES", "Suite", "get_suite", "OPS", "Problem", "config_label",
           "make_inputs", "PROVIDERS", "Prepared", "Provider", "get_providers", "register"]
