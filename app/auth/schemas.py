"""User and token schemas: what clients send and see about people."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, JsonValue, StringConstraints

from app.core.schemas import NotNull, omittable
from app.core.tables import Role

Username = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=3, max_length=50, pattern=r"^[A-Za-z0-9_.-]+$")
]
Password = Annotated[str, Field(min_length=8, max_length=128)]
FullName = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]
PrimaryKey = Annotated[int, Field(gt=0, le=2**31 - 1)]

USER_EXAMPLE: dict[str, JsonValue] = {
    "id": 7,
    "email": "ana@example.com",
    "username": "ana",
    "full_name": "Ana Lima",
    "role": "user",
    "is_active": True,
    "created_at": "2025-01-31T09:30:00Z",
}


class UserCreate(BaseModel):
    """Registration. `role` and `is_active` are not accepted: new users are always `user`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"email": "ana@example.com", "username": "ana", "full_name": "Ana Lima", "password": "s3cret-pass"}
            ]
        }
    )

    email: EmailStr
    username: Username
    full_name: FullName | None = None
    password: Password


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [USER_EXAMPLE]})

    id: int
    email: str
    username: str
    full_name: str | None
    role: Role
    is_active: bool
    created_at: datetime


class UserUpdate(BaseModel):
    """Changes to one's own account. `password` needs the right `current_password`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"full_name": "Ana M. Lima"}, {"password": "n3w-passw0rd", "current_password": "s3cret-pass"}]
        }
    )

    # Each may be left out; only `full_name` may be null (to clear it).
    username: Annotated[Username | None, NotNull] = Field(None, json_schema_extra=omittable)
    email: Annotated[EmailStr | None, NotNull] = Field(None, json_schema_extra=omittable)
    full_name: FullName | None = None
    password: Annotated[Password | None, NotNull] = Field(None, json_schema_extra=omittable)
    current_password: Annotated[str, Field(max_length=128)] | None = None


class LoginRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"username": "admin", "password": "admin123"}]})

    username: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=320)]
    password: Annotated[str, Field(min_length=1, max_length=128)]


class Token(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"access_token": "<JWT>", "token_type": "bearer", "expires_in": 3600, "user": USER_EXAMPLE}]
        }
    )

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires")
    user: UserPublic


class RoleUpdate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"role": "analyst"}]})

    role: Role


class UserList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"users": [USER_EXAMPLE], "total": 1}]})

    users: list[UserPublic]
    total: int


class UserWithProfileStats(UserPublic):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{**USER_EXAMPLE, "total_predictions": 42, "total_saved_profiles": 3}]}
    )

    total_predictions: int
    total_saved_profiles: int


class AdminUserView(UserPublic):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{**USER_EXAMPLE, "total_predictions": 42, "total_profiles": 3}]}
    )

    total_predictions: int
    total_profiles: int


class AdminUserList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "users": [{**USER_EXAMPLE, "total_predictions": 42, "total_profiles": 3}],
                    "total": 1,
                    "total_predictions": 42,
                    "total_profiles": 3,
                }
            ]
        }
    )

    users: list[AdminUserView]
    total: int
    total_predictions: int
    total_profiles: int


class Message(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"message": "Logged out"}]})

    message: str
