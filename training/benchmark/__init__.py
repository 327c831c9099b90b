"""Time captioners side by side: each model's default call, batch-1 latency and batch-N throughput.

    python -m training.benchmark --diffusion assets/checkpoints/shapes-diffusion-block \\
        --baseline assets/checkpoints/shapes-baseline --out docs/benchmark.json

``suites`` builds what is timed (every model with its own checkpoint defaults, from images and from
precomputed features), ``measure`` times it (interleaved repeats, CUDA synchronised, peak memory), and
``report`` writes the table and the JSON. The quality of the same captions is ``training.evaluate``'s job.
"""
