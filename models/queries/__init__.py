"""Query and command functions over the models, one module per aggregate.

Every function takes the session and never commits: the caller owns the transaction
(``worker.platform.db.session_scope``). Functions may flush so constraint violations surface
at the call that caused them. Secrets go in and out only through the ``store_*`` /
``reveal_*`` functions, which seal and unseal with the caller's :class:`~models.sealing.Sealer`
bound to the row (table, id, purpose), so a sealed value copied to another row does not open.

``from models import queries; queries.get_run(...)`` reaches every function; the modules are
certificates, credentials, targets, groups, distributions, runs, results (claims and
records), snapshots and keys (rotation).
"""

from models.errors import AlreadyExistsError, InvalidRecordError, NotFoundError, RunStateError
from models.queries.certificates import (
    BundleLike,
    CertificateFacts,
    get_certificate,
    list_certificates,
    replace_certificate,
    reveal_private_key,
    store_certificate,
)
from models.queries.credentials import (
    get_credential,
    get_credential_by_name,
    list_credentials,
    replace_credential_secret,
    reveal_credential,
    store_credential,
    unseal_credential,
)
from models.queries.distributions import (
    create_distribution,
    distribution_target_ids,
    get_distribution,
    list_distributions,
    next_distribution,
)
from models.queries.groups import (
    FanoutValue,
    create_group,
    get_group,
    get_group_by_name,
    group_target_ids,
    group_targets,
    list_groups,
    set_group_members,
)
from models.queries.keys import ENVELOPE_COLUMNS, envelope_key_usage, rotate_keys
from models.queries.results import (
    Claim,
    ClaimedTarget,
    HeldClaim,
    ResultRecord,
    batch_has_open_row,
    claim_results,
    count_live_claims,
    count_results,
    list_target_results,
    load_claimed_targets,
    lost_target_ids,
    record_results,
    release_claims,
    results_with_target_names,
    skip_pending_results,
)
from models.queries.runs import (
    advance_batch,
    child_run_id,
    create_run,
    finish_run,
    get_run,
    heartbeat,
    list_runs,
    load_run_context,
    note_recovery,
    queued_runs_before,
    recoveries,
    stale_runs,
    start_run,
)
from models.queries.snapshots import (
    distribution_snapshot,
    get_snapshot,
    record_snapshot_write,
    reveal_snapshot,
    save_snapshot_if_absent,
)
from models.queries.targets import (
    create_target,
    get_target,
    get_target_by_name,
    list_targets,
    record_health,
    target_group_names,
)

__all__ = [
    "ENVELOPE_COLUMNS",
    "AlreadyExistsError",
    "BundleLike",
    "CertificateFacts",
    "Claim",
    "ClaimedTarget",
    "FanoutValue",
    "HeldClaim",
    "InvalidRecordError",
    "NotFoundError",
    "ResultRecord",
    "RunStateError",
    "advance_batch",
    "batch_has_open_row",
    "child_run_id",
    "claim_results",
    "count_live_claims",
    "count_results",
    "create_distribution",
    "create_group",
    "create_run",
    "create_target",
    "distribution_snapshot",
    "distribution_target_ids",
    "envelope_key_usage",
    "finish_run",
    "get_certificate",
    "get_credential",
    "get_credential_by_name",
    "get_distribution",
    "get_group",
    "get_group_by_name",
    "get_run",
    "get_snapshot",
    "get_target",
    "get_target_by_name",
    "group_target_ids",
    "group_targets",
    "heartbeat",
    "list_certificates",
    "list_credentials",
    "list_distributions",
    "list_groups",
    "list_runs",
    "list_target_results",
    "list_targets",
    "load_claimed_targets",
    "load_run_context",
    "lost_target_ids",
    "next_distribution",
    "note_recovery",
    "queued_runs_before",
    "record_health",
    "record_results",
    "record_snapshot_write",
    "recoveries",
    "release_claims",
    "replace_certificate",
    "replace_credential_secret",
    "results_with_target_names",
    "reveal_credential",
    "reveal_private_key",
    "reveal_snapshot",
    "rotate_keys",
    "save_snapshot_if_absent",
    "set_group_members",
    "skip_pending_results",
    "stale_runs",
    "start_run",
    "store_certificate",
    "store_credential",
    "target_group_names",
    "unseal_credential",
]
