"""The Gemma 4 model: configuration, building blocks, text decoder, vision tower, processor and checkpoints."""
