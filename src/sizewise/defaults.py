"""Defaults shared by the CLI and the Python API, in a module that imports nothing heavy
(the CLI reads them while defining its options, before torch is loaded)."""

# Held-out samples (x calibration length) on which the allocator compares candidate plans by
# measured KL: enough to separate plans whose KL differs by 10% or more. On SmolLM2, 4 chose the
# same plans as 8 at 2.5-5 bits per weight in about half the time (bench/results/budget.json).
MEASURE_SAMPLES = 4
