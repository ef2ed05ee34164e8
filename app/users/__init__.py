"""User accounts: registration, the caller's own account, and admins' management of users."""
