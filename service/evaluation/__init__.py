"""Evaluation: the reference's protocols, frozen-feature probes, the kNN monitor, the comparison."""
