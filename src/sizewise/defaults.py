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

# Calibration tokens over which each linear's llama.cpp input-rounding error (e eᵀ, per rounding
# kind) is gathered when the allocator prices a GGUF's arithmetic. The rounding acts on every
# block of every token alike, so its second moment settles on far fewer tokens than XᵀX needs;
# 8192 (16 x 512) keeps the extra Gram products to an eighth of the profile pass's.
ROUNDING_TOKENS = 8192

# Logits held at once when the allocator measures a KL (plans, token tables, rounding costs): the
# head runs on a few positions of a forward batch at a time so that its logits take at most this
# much, and each chunk is reduced against the reference as soon as it is computed.
LOGIT_BYTES = 256 << 20

# The float model's log-probabilities that measured plans are compared with are kept in float32 up
# to this size, in float16 above it (Qwen2.5's 151,936-token vocabulary over 8 x 512 tokens: 2.5 GB
# in float32). Float16 moves a plan's KL by ~1e-5 nats, about the same for every plan: negligible
# beside whole plans' KLs (0.01-1), not beside tiny ones, hence float32 where it is affordable.
REFERENCE_FLOAT32_BYTES = 1 << 30

# A safetensors model whose float32 copy is larger than this keeps its decoder layers on disk
# (`lazy`), each read only while it runs, so that compressing it needs about one layer's memory and
# not the model's: a 1.5B model loaded whole holds its 3.1 GB of bf16 weights (and their file pages)
# beside each float32 layer. Below it (SmolLM2-135M: 0.5 GB) the whole model stays in memory, which
# saves re-reading every layer at each of the many forward passes a budget's measurements make.
LAZY_ABOVE_BYTES = 2 << 30
