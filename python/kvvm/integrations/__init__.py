"""Integrations of kvvm with model libraries (imported on demand)."""
