"""What every domain stands on: settings, the database, errors, security, logging and metrics, HTTP pieces."""
