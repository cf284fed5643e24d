"""Evaluation: one runner, metrics, plots, synthetic anomalies, the brain benchmark, scan pairs
and the FashionMNIST experiment."""
