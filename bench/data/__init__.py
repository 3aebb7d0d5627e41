"""Training data: SynthFace (procedural faces), splits, samplers and batch loading."""
