"""The one statement a SQL source may run: a single SELECT (or WITH ... SELECT), nothing that writes.

This is the first of two guards: the query is also run in a read-only transaction (app.sources.sql),
which refuses whatever writes despite looking like a SELECT (a function with side effects, SELECT INTO).
"""

from __future__ import annotations

import sqlparse
from sqlparse import tokens

from app.core.errors import InvalidInput

MAX_QUERY_LENGTH = 20_000
# Statements that change data or schema, wherever they appear (a writable CTE hides one in a SELECT).
_WRITES = {"INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "TRUNCATE", "COPY", "CALL", "DO"}


def check_query(query: str) -> str:
    """The query without a trailing `;`, if it is one SELECT that writes nothing; else 422 saying why."""
    text = query.strip()
    if not text:
        raise InvalidInput("query: give one SELECT statement")
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidInput(f"query: at most {MAX_QUERY_LENGTH} characters")
    if "\x00" in text:
        raise InvalidInput("query: may not contain NUL characters")
    statements = [s for s in sqlparse.parse(text) if s.token_first(skip_cm=True, skip_ws=True) is not None]
    if len(statements) != 1:
        raise InvalidInput("query: exactly one statement, without `;` between statements")
    statement = statements[0]
    if statement.get_type() != "SELECT":
        raise InvalidInput("query: only a SELECT (or WITH ... SELECT) statement is allowed")
    for token in statement.flatten():
        word = token.normalized.upper()
        if token.ttype in tokens.Keyword.DDL or (token.ttype in tokens.Keyword.DML and word != "SELECT"):
            raise InvalidInput(f"query: a SELECT that reads only: {word} is not allowed")
        if token.ttype in tokens.Keyword and word in _WRITES:
            raise InvalidInput(f"query: a SELECT that reads only: {word} is not allowed")
    return text.rstrip().rstrip(";").rstrip()
