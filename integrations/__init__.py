"""Integrations with trainer frameworks: Ray (`ray_worker`)."""
