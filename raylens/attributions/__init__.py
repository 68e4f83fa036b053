"""Attributions: which input elements drive a prediction or a generated token."""
