"""Saved customer profiles, each shown with its segment under the active model."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from app.auth.dependencies import CurrentUser
from app.auth.schemas import Message, PrimaryKey
from app.core.deps import PageDep, SessionDep
from app.core.responses import errors
from app.core.tables import CustomerProfile
from app.profiles import service as profile_service
from app.profiles.schemas import ProfileCreate, ProfilePublic, ProfileUpdate

router = APIRouter(prefix="/profiles", tags=["profiles"])


def _public(request: Request, profiles: list[CustomerProfile]) -> list[ProfilePublic]:
    model = request.app.state.models.current
    out = [ProfilePublic.model_validate(p) for p in profiles]
    if model is not None and out:
        assignments = model.assign(profiles)
        for item, (cluster, name, _confidence) in zip(out, assignments, strict=True):
            item.cluster, item.cluster_name = cluster, name
    return out


@router.post(
    "/",
    status_code=status.HTTP_201_CREATED,
    summary="Save a customer profile",
    description="`cluster` and `cluster_name` are the profile's segment under the active model (null while none).",
    responses=errors(401, 403, 422),
)
async def create_profile(
    body: ProfileCreate, user: CurrentUser, session: SessionDep, request: Request
) -> ProfilePublic:
    profile = await profile_service.create(session=session, user_id=user.id, fields=body.model_dump())
    return _public(request, [profile])[0]


@router.get(
    "/",
    summary="My saved profiles, newest first",
    description="The caller's own profiles as a JSON list, paged with `skip` and `limit`, each with its "
    "segment under the active model.",
    responses=errors(401, 403, 422),
)
async def list_profiles(user: CurrentUser, session: SessionDep, page: PageDep, request: Request) -> list[ProfilePublic]:
    profiles = await profile_service.list_own(session=session, user_id=user.id, skip=page.skip, limit=page.limit)
    return _public(request, profiles)


@router.get(
    "/{profile_id}",
    summary="One of my profiles",
    description="Owner only: another user's profile is 404, never 403.",
    responses=errors(401, 403, 404, 422),
)
async def get_profile(
    profile_id: PrimaryKey, user: CurrentUser, session: SessionDep, request: Request
) -> ProfilePublic:
    profile = await profile_service.get_own(session=session, user_id=user.id, profile_id=profile_id)
    return _public(request, [profile])[0]


@router.put(
    "/{profile_id}",
    summary="Change one of my profiles",
    description="Send any subset of the fields; the others keep their value.",
    responses=errors(401, 403, 404, 422),
)
async def update_profile(
    profile_id: PrimaryKey, body: ProfileUpdate, user: CurrentUser, session: SessionDep, request: Request
) -> ProfilePublic:
    profile = await profile_service.update_own(
        session=session, user_id=user.id, profile_id=profile_id, changes=body.model_dump(exclude_unset=True)
    )
    return _public(request, [profile])[0]


@router.delete(
    "/{profile_id}",
    summary="Delete one of my profiles",
    description="Owner only: another user's profile is 404, never 403.",
    responses=errors(401, 403, 404, 422),
)
async def delete_profile(profile_id: PrimaryKey, user: CurrentUser, session: SessionDep) -> Message:
    await profile_service.delete_own(session=session, user_id=user.id, profile_id=profile_id)
    return Message(message="Profile deleted")
