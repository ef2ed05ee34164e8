"""Logging in and out: tokens, login throttling, the caller of a request."""
