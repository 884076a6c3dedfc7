"""leader-sidecar: Lease leader election served to the app next to it."""

__version__ = "0.1.0"
