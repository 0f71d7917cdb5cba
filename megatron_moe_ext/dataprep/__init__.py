"""Data preparation: the demo corpus and tokenization into Megatron indexed datasets."""
