"""Named problem sets shared by tests, tuner and benchmarks."""
