"""Frontends: each maps one model format onto the shared GraphView and applies the edit
vocabulary."""
