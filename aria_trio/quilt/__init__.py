"""Quilt: the internal daemon that runs containers (bubblewrap sandboxes) and keeps bundles."""
