"""Webhooks: admins subscribe URLs to events; a durable outbox delivers them, signed (Standard Webhooks)."""
