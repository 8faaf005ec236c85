"""The lab bench: timing and provenance, profiling, accuracy, benchmarks, figures and the README's tables."""
