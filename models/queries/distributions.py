"""Distributions: a certificate attached to a target or group (Kubernetes) or to a webhook."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.entities import Distribution
from models.enums import DistributionKind
from models.errors import InvalidRecordError
from models.queries._common import get_row
from models.queries.certificates import get_certificate
from models.queries.credentials import get_credential
from models.queries.groups import get_group, group_target_ids
from models.queries.targets import get_target

__all__ = [
    "create_distribution",
    "distribution_target_ids",
    "get_distribution",
    "list_distributions",
    "next_distribution",
]


def create_distribution(
    session: Session,
    *,
    certificate_id: str,
    target_id: str | None = None,
    group_id: str | None = None,
    store_content: bool = False,
    kind: DistributionKind | str = DistributionKind.KUBERNETES,
    webhook_url: str | None = None,
    webhook_credential_id: str | None = None,
    position: int | None = None,
) -> Distribution:
    """Attach a certificate to a target or group (or a webhook); appended unless ``position``."""
    get_certificate(session, certificate_id)
    distribution_kind = DistributionKind(kind)
    if distribution_kind is DistributionKind.KUBERNETES:
        if (target_id is None) == (group_id is None):
            raise InvalidRecordError(
                "a Kubernetes distribution goes to exactly one target or one group; "
                f"got target={target_id!r}, group={group_id!r}"
            )
        if webhook_url is not None or webhook_credential_id is not None:
            raise InvalidRecordError("a Kubernetes distribution takes no webhook URL/credential")
        if target_id is not None:
            get_target(session, target_id)
        if group_id is not None:
            get_group(session, group_id)
    else:
        if target_id is not None or group_id is not None or not webhook_url:
            raise InvalidRecordError(
                "a webhook distribution needs a webhook URL and no target or group"
            )
        if webhook_credential_id is not None:
            get_credential(session, webhook_credential_id)
    if position is None:
        highest = session.scalar(
            select(func.max(Distribution.position)).where(
                Distribution.certificate_id == certificate_id
            )
        )
        position = 0 if highest is None else highest + 1
    distribution = Distribution(
        certificate_id=certificate_id,
        kind=distribution_kind,
        target_id=target_id,
        group_id=group_id,
        webhook_url=webhook_url,
        webhook_credential_id=webhook_credential_id,
        store_content=store_content,
        position=position,
    )
    session.add(distribution)
    session.flush()
    return distribution


def get_distribution(session: Session, distribution_id: str) -> Distribution:
    """The distribution with this id, or NotFoundError."""
    return get_row(session, Distribution, distribution_id, "distribution")


def list_distributions(session: Session, certificate_id: str | None = None) -> list[Distribution]:
    """Distributions (of one certificate, or all), in stacking order."""
    query = select(Distribution).order_by(Distribution.certificate_id, Distribution.position)
    if certificate_id is not None:
        query = query.where(Distribution.certificate_id == certificate_id)
    return list(session.scalars(query))


def next_distribution(session: Session, distribution: Distribution) -> Distribution | None:
    """The distribution stacked right after this one on the same certificate, if any."""
    query = (
        select(Distribution)
        .where(
            Distribution.certificate_id == distribution.certificate_id,
            Distribution.position > distribution.position,
        )
        .order_by(Distribution.position)
        .limit(1)
    )
    return session.scalars(query).first()


def distribution_target_ids(session: Session, distribution: Distribution) -> list[str]:
    """The target ids a Kubernetes distribution writes to, in fan-out order."""
    if distribution.target_id is not None:
        return [distribution.target_id]
    if distribution.group_id is not None:
        return group_target_ids(session, distribution.group_id)
    return []
