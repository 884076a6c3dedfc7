"""Opt-in ways to connect the election to the app and the cluster around it."""
