"""Barlow Twins pretraining as a service: a faithful re-implementation of facebookresearch/barlowtwins."""
