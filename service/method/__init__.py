"""The method: the network, the loss, LARS and its schedule, the augmentations."""
