"""SQLAlchemy models, query functions and migrations of the CertAutoPilot Kubernetes worker.

Import models from here; query/command functions live in :mod:`models.queries` (one module per
aggregate), migrations are run with :mod:`models.migrate` (``certautopilot migrate``). The
models import nothing from ``worker``: secrets are sealed through the caller's
:class:`models.sealing.Sealer`, and fan-out values are validated by the application.
"""

from models.base import Base, new_id, utcnow
from models.entities import (
    Certificate,
    Credential,
    Distribution,
    RollbackSnapshot,
    Run,
    Target,
    TargetGroup,
    TargetGroupMember,
    TargetResult,
    WorkerHeartbeat,
)
from models.enums import (
    ConnectionMode,
    CredentialKind,
    DistributionKind,
    HealthStatus,
    ResultStatus,
    RunAction,
    RunState,
)
from models.errors import DATABASE_OUTAGE_ERRORS
from models.rollback import Availability, rollback_availability

__all__ = [
    "DATABASE_OUTAGE_ERRORS",
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
    "TargetResult",
    "WorkerHeartbeat",
    "new_id",
    "rollback_availability",
    "utcnow",
]
