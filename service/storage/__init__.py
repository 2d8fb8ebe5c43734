"""Checkpoints and storage: fsspec filesystems, checkpoints, the run lease, exports, credentials."""
