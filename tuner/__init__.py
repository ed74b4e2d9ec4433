"""Per-GPU search of the kernels' tunable parameters into config caches the kernels read at run time."""
