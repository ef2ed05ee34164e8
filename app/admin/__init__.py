"""The admin views: users with their activity, and the service's statistics."""
