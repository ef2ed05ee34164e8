"""Prediction history: the rows every answered prediction writes, and their pages."""
