"""Qwen3 models: presets with random weights, for tests, demos and benchmarks."""
