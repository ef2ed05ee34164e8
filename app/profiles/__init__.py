"""Saved customer profiles with their current segment."""
