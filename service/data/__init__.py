"""The data: data sets, the world-size-independent sampler and loader, labelled subsets, seeds."""
