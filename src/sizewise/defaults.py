"""Defaults shared by the CLI and the Python API, in a module that imports nothing heavy
(the CLI reads them while defining its options, before torch is loaded)."""

# Held-out samples (x calibration length) on which the allocator compares candidate plans by
# measured KL. 4 samples cost 20% less on SmolLM2 but chose a different plan at 5 bits per
# weight than 8 did, where the candidate plans' KLs differ by under 1% (bench/results/budget.json).
MEASURE_SAMPLES = 8
