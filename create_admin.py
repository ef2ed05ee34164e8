"""Create the first accounts: an admin and a plain user, unless they exist.

    python create_admin.py                       # admin/admin123 and testuser/test123
    python create_admin.py --username ops --password 's3cret-long' --email ops@example.com --no-test-user

Creates the database tables on a fresh database. Exits 0 whether it created the
accounts or found them. With APP_ENV=production it refuses the default passwords.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from app import auth
from app.config import get_settings
from app.database import Database, Role
from app.errors import Conflict
from app.services import users as user_service

DEFAULT_ADMIN = ("admin", "admin123", "admin@example.com")
DEFAULT_USER = ("testuser", "test123", "testuser@example.com")
DEFAULT_PASSWORDS = {DEFAULT_ADMIN[1], DEFAULT_USER[1]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Create the admin account (and a plain test user) in the configured database "
        "(DATABASE_URL or .env). Idempotent: existing accounts are reported and left unchanged."
    )
    parser.add_argument("--username", default=DEFAULT_ADMIN[0], help="admin username (default: %(default)s)")
    parser.add_argument("--password", default=DEFAULT_ADMIN[1],
                        help="admin password (default: %(default)s; refused when APP_ENV=production)")
    parser.add_argument("--email", default=None, help="admin email (default: <username>@example.com)")
    parser.add_argument("--full-name", default="Administrator", help="admin full name (default: %(default)s)")
    parser.add_argument("--role", choices=[r.value for r in Role], default=Role.admin.value,
                        help="role of the account created by --username (default: %(default)s)")
    parser.add_argument("--test-username", default=DEFAULT_USER[0], help="plain user's username (default: %(default)s)")
    parser.add_argument("--test-password", default=DEFAULT_USER[1], help="plain user's password (default: %(default)s)")
    parser.add_argument("--no-test-user", action="store_true", help="do not create the plain test user")
    return parser.parse_args(argv)


async def ensure_user(database: Database, *, username: str, password: str, email: str, full_name: str,
                      role: Role, rounds: int) -> None:
    async with database.sessionmaker() as session:
        existing = await user_service.find_by_login(session=session, login=username)
        if existing is not None:
            print(f"User '{username}' already exists (role {existing.role}); left unchanged.")
            return
        hashed = auth.hash_password(password, rounds)
        try:
            await user_service.create(session=session, email=email, username=username, full_name=full_name,
                                      hashed_password=hashed, role=role)
        except Conflict as exc:
            print(f"User '{username}' not created: {exc.message}.")
            return
        print(f"Created user '{username}' with role {role.value}.")


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    accounts = [(args.username, args.password, args.email or f"{args.username}@example.com", args.full_name,
                 Role(args.role))]
    if not args.no_test_user:
        accounts.append((args.test_username, args.test_password, f"{args.test_username}@example.com",
                         "Test User", Role.user))
    if settings.app_env == "production":
        weak = [name for name, password, *_ in accounts if password in DEFAULT_PASSWORDS or len(password) < 8]
        if weak:
            print(f"Refusing default or short passwords in production for: {', '.join(weak)}. "
                  "Pass --password (and --test-password, or --no-test-user).", file=sys.stderr)
            return 2
    database = Database(settings.database_url)
    try:
        from app.migrations import upgrade_database

        await upgrade_database(database)
        for username, password, email, full_name, role in accounts:
            await ensure_user(database, username=username, password=password, email=email, full_name=full_name,
                              role=role, rounds=settings.bcrypt_rounds)
    finally:
        await database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
