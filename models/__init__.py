"""SQLAlchemy models, query functions and migrations of the CertAutoPilot Kubernetes worker.

Import models from here; query/command functions live in :mod:`models.queries`, migrations
are run with :mod:`models.migrate` (``certautopilot migrate``).
"""

from models.base import Base, new_id, utcnow
from models.entities import (
    DEFAULT_SECRET_NAME_TEMPLATE,
    Certificate,
    Credential,
    Distribution,
    RollbackSnapshot,
    Run,
    Target,
    TargetGroup,
    TargetGroupMember,
    TargetResult,
)
from models.enums import (
    ConnectionMode,
    CredentialKind,
    DistributionKind,
    HealthStatus,
    ResultStatus,
    RunAction,
    RunState,
    TargetModule,
)
from models.rollback import Availability, rollback_availability

__all__ = [
    "DEFAULT_SECRET_NAME_TEMPLATE",
    "Availability",
    "Base",
    "Certificate",
    "ConnectionMode",
    "Credential",
    "CredentialKind",
    "Distribution",
    "DistributionKind",
    "HealthStatus",
    "ResultStatus",
    "RollbackSnapshot",
    "Run",
    "RunAction",
    "RunState",
    "Target",
    "TargetGroup",
    "TargetGroupMember",
    "TargetModule",
    "TargetResult",
    "new_id",
    "rollback_availability",
    "utcnow",
]
