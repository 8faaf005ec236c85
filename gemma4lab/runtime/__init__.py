"""Running the model fast: fused-kernel switches, piecewise CUDA graphs for prefill, the decode graph, generation."""
