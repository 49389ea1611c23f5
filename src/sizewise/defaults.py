"""Defaults shared by the CLI and the Python API, in a module that imports nothing heavy
(the CLI reads them while defining its options, before torch is loaded)."""

# Held-out samples (x calibration length) on which the allocator compares candidate plans by
# measured KL. 4 samples cost 20% less on SmolLM2 but chose different plans than 8 did at 3.5 and
# 5 bits per weight, where the candidates' measured KLs are within 1% (bench/results/budget.json).
MEASURE_SAMPLES = 8

# Calibration samples (x calibration length) whose final hidden states give the output head's
# input statistics, with which calibrated quantizers (GPTQ) solve the head or the embedding tied to
# it. 32 x 512 tokens for SmolLM2's 576 inputs; one forward pass, stopped before the logits.
HEAD_SAMPLES = 32
