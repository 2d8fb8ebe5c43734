"""Launching jobs: the TorchX scheduler for Kubernetes (Volcano), the spec a job carries, `barlow submit`."""
