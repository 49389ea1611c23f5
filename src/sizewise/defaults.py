"""Defaults shared by the CLI and the Python API, in a module that imports nothing heavy
(the CLI reads them while defining its options, before torch is loaded)."""

# Held-out samples (x calibration length) on which the allocator compares candidate plans by
# measured KL. 4 samples cost 20% less on SmolLM2 but chose different plans than 8 did at 3.5 and
# 5 bits per weight, where the candidates' measured KLs are within 1% (bench/results/budget.json).
MEASURE_SAMPLES = 8
