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

from app.auth.service import find_by_login
from app.core import security as auth
from app.core.config import get_settings
from app.core.database import Database
from app.core.errors import Conflict
from app.core.tables import Role
from app.users import service as user_service

DEFAULT_ADMIN = ("admin", "admin123", "admin@example.com")
DEFAULT_USER = ("testuser", "test123", "testuser@example.com")
DEFAULT_PASSWORDS = {DEFAULT_ADMIN[1], DEFAULT_USER[1]}

HELP_EPILOG = """\
examples:
  python create_admin.py
      admin/admin123 (admin) and testuser/test123 (user), for development
  python create_admin.py --username ops --password 'a-long-secret' --email ops@example.com --no-test-user
      one admin of your own, for production
  python create_admin.py --username ana --password 'another-secret' --role analyst --no-test-user
      an analyst account

environment (or .env):
  DATABASE_URL   the database to write to (default: sqlite+aiosqlite:///./customer_segmentation.db)
  BCRYPT_ROUNDS  cost factor of the password hashes (default: 12)
  APP_ENV        with APP_ENV=production the default passwords and passwords
                 shorter than 8 characters are refused (exit code 2)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Create the admin account (and a plain test user) in the configured database\n"
        "(DATABASE_URL or .env), creating the tables on a fresh database. Idempotent: existing\n"
        "accounts are reported and left unchanged (a password is never reset). Exits 0 whether\n"
        "it created the accounts or found them, 2 when it refuses.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--username", default=DEFAULT_ADMIN[0], help="username of the account to create (default: %(default)s)"
    )
    parser.add_argument(
        "--password",
        default=DEFAULT_ADMIN[1],
        help="its password (default: %(default)s; refused when APP_ENV=production)",
    )
    parser.add_argument("--email", default=None, help="its email (default: <username>@example.com)")
    parser.add_argument("--full-name", default="Administrator", help="its full name (default: %(default)s)")
    parser.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default=Role.admin.value,
        help="role of the account created by --username (default: %(default)s)",
    )
    parser.add_argument(
        "--test-username",
        default=DEFAULT_USER[0],
        help="username of the plain test user, role user (default: %(default)s)",
    )
    parser.add_argument(
        "--test-password",
        default=DEFAULT_USER[1],
        help="its password (default: %(default)s; refused when APP_ENV=production)",
    )
    parser.add_argument("--no-test-user", action="store_true", help="create only the --username account, no test user")
    return parser.parse_args(argv)


async def ensure_user(
    database: Database, *, username: str, password: str, email: str, full_name: str, role: Role, rounds: int
) -> None:
    async with database.sessionmaker() as session:
        existing = await find_by_login(session=session, login=username)
        if existing is not None:
            print(f"User '{username}' already exists (role {existing.role}); left unchanged.")
            return
        hashed = auth.hash_password(password, rounds)
        try:
            await user_service.create(
                session=session, email=email, username=username, full_name=full_name, hashed_password=hashed, role=role
            )
        except Conflict as exc:
            print(f"User '{username}' not created: {exc.message}.")
            return
        print(f"Created user '{username}' with role {role.value}.")


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    accounts = [
        (args.username, args.password, args.email or f"{args.username}@example.com", args.full_name, Role(args.role))
    ]
    if not args.no_test_user:
        accounts.append(
            (args.test_username, args.test_password, f"{args.test_username}@example.com", "Test User", Role.user)
        )
    if settings.app_env == "production":
        weak = [name for name, password, *_ in accounts if password in DEFAULT_PASSWORDS or len(password) < 8]
        if weak:
            print(
                f"Refusing default or short passwords in production for: {', '.join(weak)}. "
                "Pass --password (and --test-password, or --no-test-user).",
                file=sys.stderr,
            )
            return 2
    database = Database(settings.database_url)
    try:
        from app.core.migrations import upgrade_database

        await upgrade_database(database)
        for username, password, email, full_name, role in accounts:
            await ensure_user(
                database,
                username=username,
                password=password,
                email=email,
                full_name=full_name,
                role=role,
                rounds=settings.bcrypt_rounds,
            )
    finally:
        await database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
