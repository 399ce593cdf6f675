"""The bench stage: latency on every backend, timed interleaved, with its noise and a regression gate."""
