"""Benchmarks and measurements behind the scripts: the MoE layer benchmark, calibration of a
cluster file, the validation sweep of the performance model, trace timelines, statistics."""
