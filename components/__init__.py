"""TorchX components of the Barlow Twins service (registered under the `torchx.components` entry point)."""
