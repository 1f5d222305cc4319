"""Benchmarks of lightning_nexus, run from the repository root as modules (results in benchmarks/RESULTS.md):

    python -m benchmarks.overhead_cpu          NexusCallback vs plain accumulation, tiny GPT on CPU
    python -m benchmarks.monitor_overhead_cpu  GradSimilarityMonitor cost
    python -m benchmarks.throughput            tokens/s, MFU and peak memory of Nexus vs AdamW (GPU or CPU)
    python -m benchmarks.data_throughput       corpus build time and DataModule tokens/s

``benchmarks.ab`` holds the alternating A/B loop they share.
"""
