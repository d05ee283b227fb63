"""Speed and memory suite of the fused partial convolution (``python -m benchmarks``)."""
