"""How the CLI shows things: rich tables, JSON, Secret diffs and a run in progress.

Nothing here prints secret material: the values shown come from the operator views in
:mod:`worker.app.service` and from stored diffs (``SecretDiff.to_dict()``), which hold
certificate facts and public-key hashes only.

Everything shown is untrusted text: names, namespaces, template sources, variables, diff values
and the API server's error texts come from operators and clusters. This module owns how such
text reaches a terminal: :func:`safe_text` strips terminal control sequences, and the consoles
from :func:`make_console` never interpret a string as Rich markup or emoji codes, so a value
such as ``[/]`` or ``[link=...]`` prints literally. Styling is applied with
:class:`rich.text.Text` styles only (:func:`plain`), never by formatting markup strings.
``--output json`` bypasses all of it (:func:`emit_json` writes the exact values).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from models.enums import ResultStatus, RunState
from worker.core.consumers import consumers_from_dict, render_consumers
from worker.core.secret import (
    BundleSummary,
    CertificateSummary,
    DataEntry,
    KeySummary,
    MetaChange,
    OpaqueSummary,
    SecretDiff,
    render_diff,
)

if TYPE_CHECKING:  # the service layer (SQLAlchemy, kubernetes) is not needed for `--help`
    from worker.app.service import RunReport, TargetResultView

__all__ = [
    "ColorMode",
    "OutputFormat",
    "SafeConsole",
    "diff_from_dict",
    "diff_summary",
    "emit",
    "emit_json",
    "follow_run",
    "make_console",
    "names_of",
    "plain",
    "print_report",
    "reason_words",
    "render_diff_dict",
    "result_table",
    "run_headline",
    "safe_text",
    "set_color_mode",
    "status_text",
    "status_words",
    "to_jsonable",
]

#: Width used when output goes to a pipe or file, so ids and paths are not folded.
PIPE_WIDTH = 160


class OutputFormat(StrEnum):
    """What listing and show commands print (``--output``, like kubectl's ``-o``)."""

    TABLE = "table"
    """Tables and words for people (the default)."""
    TEXT = "text"
    """The same as ``table`` (the name before ``table`` existed; kept for scripts)."""
    JSON = "json"
    """The exact values, status codes included (``would_update``)."""
    YAML = "yaml"
    """The same values as ``json``, as YAML."""
    NAME = "name"
    """Ids only, one per line (``runs list -o name | xargs ...``)."""

    @property
    def machine(self) -> bool:
        """True for the formats scripts read: json, yaml, name."""
        return self in (OutputFormat.JSON, OutputFormat.YAML, OutputFormat.NAME)


class ColorMode(StrEnum):
    """``--color``: colour and box drawing on a terminal (auto), always, or never."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


_color = ColorMode.AUTO


def set_color_mode(mode: ColorMode) -> None:
    """Set ``--color`` for every console this process makes afterwards."""
    global _color
    _color = mode


# ------------------------------------------------------------------------- untrusted text

_TERMINAL_CONTROLS = re.compile(
    "|".join(
        (
            r"\x1b\[[0-?]*[ -/]*[@-~]?",  # CSI: colours, cursor moves, erasing (ECMA-48)
            r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?",  # OSC: titles, OSC 8 links; to BEL or ST
            r"\x1b[PX^_][^\x1b]*(?:\x1b\\)?",  # DCS, SOS, PM, APC strings up to ST
            r"\x1b.?",  # any other escape sequence (and a lone ESC)
            r"[\x00-\x08\x0b-\x1f\x7f-\x9f]",  # other C0 controls (not tab/newline), DEL, C1
            r"[\u202a-\u202e\u2066-\u2069]",  # bidirectional overrides: reorder what is shown
        )
    )
)


def safe_text(value: object) -> str:
    """``value`` as text that cannot drive the terminal: control sequences removed.

    ANSI CSI/OSC sequences (colours, cursor moves, OSC 8 hyperlinks), carriage returns and every
    other C0/C1 control character go, as do Unicode bidirectional overrides; newline and tab
    stay because multi-line values (error texts, diffs) are legitimate.
    """
    return _TERMINAL_CONTROLS.sub("", str(value))


def plain(value: object, style: str = "") -> Text:
    """``value`` shown literally (never markup), control sequences removed, optionally styled."""
    return Text(safe_text(value), style=style)


class SafeConsole(Console):
    """A console on which every string is shown literally and without control sequences.

    Rich turns strings into text in :meth:`render_str` (``print``, table cells, rule titles);
    here that never parses markup or emoji codes, whatever a caller asks, and runs
    :func:`safe_text` first. Values put into :class:`~rich.text.Text` objects go through
    :func:`plain` instead.
    """

    plain_tables: bool = False
    """Tables without box drawing (output to a pipe or a file, unless ``--color=always``)."""

    def render_str(self, text: str, **options: Any) -> Text:
        options.update(markup=False, emoji=False)
        return super().render_str(safe_text(text), **options)

    def print(self, *objects: Any, **options: Any) -> None:
        """Print; on a pipe, tables lose their borders (columns stay aligned with spaces)."""
        if self.plain_tables:
            for item in objects:
                if isinstance(item, Table):
                    item.box = None
                    item.show_edge = False
                    item.pad_edge = False
        super().print(*objects, **options)


def make_console(*, stderr: bool = False) -> Console:
    """A safe console for the current stdout (or stderr); wide and plain when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    width = None if terminal else PIPE_WIDTH
    # Pipes get whole lines (soft wrap): scripts and logs grep messages, not screen rows.
    console = SafeConsole(
        stderr=stderr,
        width=width,
        highlight=False,
        soft_wrap=width is not None,
        markup=False,
        emoji=False,
        force_terminal=True if _color is ColorMode.ALWAYS else None,
        no_color=True if _color is ColorMode.NEVER else None,
    )
    # Piped output is plain (no colour: Rich sees no terminal; no box drawing: here).
    console.plain_tables = not terminal and _color is not ColorMode.ALWAYS
    return console


# ------------------------------------------------------------------------------------ JSON


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, datetimes, mappings and sequences as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(item) for item in value]
    return value


def emit_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout (for scripts: ``--output json``)."""
    sys.stdout.write(json.dumps(to_jsonable(value), indent=2) + "\n")
    sys.stdout.flush()


def emit(output: OutputFormat, value: Any) -> None:
    """Print ``value`` in a machine format: json, yaml, or the ids only (``name``)."""
    if output is OutputFormat.NAME:
        sys.stdout.write("".join(f"{name}\n" for name in names_of(value)))
    elif output is OutputFormat.YAML:
        import yaml

        sys.stdout.write(yaml.safe_dump(to_jsonable(value), sort_keys=False, allow_unicode=True))
    else:
        emit_json(value)
        return
    sys.stdout.flush()


def names_of(value: Any) -> list[str]:
    """The ids ``--output name`` prints: of each item of a listing, or of the one shown."""
    if isinstance(value, list | tuple):
        return [name for item in value for name in names_of(item)]
    if isinstance(value, Mapping):
        for key in ("id", "run_id"):
            if key in value:
                return [str(value[key])]
        for key in ("run", "after"):  # {"run": report, "stacked": ...}, {"before", "after"}
            if key in value:
                return names_of(value[key])
        return []
    identifier = getattr(value, "id", None)
    return [str(identifier)] if identifier is not None else []


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def format_time(moment: datetime | None) -> str:
    """A timestamp as operators read it: ``2025-01-31 12:00:00Z`` (or ``-``)."""
    return "-" if moment is None else f"{_utc(moment):%Y-%m-%d %H:%M:%S}Z"


# ----------------------------------------------------------------------------------- diffs


def _summary_from_dict(
    data: Mapping[str, Any] | None,
) -> CertificateSummary | KeySummary | OpaqueSummary | BundleSummary | None:
    # The summary kinds have disjoint fields; see the to_dict() methods in core/secret.
    if data is None:
        return None
    if "format" in data:  # a combined PEM or keystore (checked first: it has a key digest too)
        certificate = _summary_from_dict(data.get("certificate"))
        return BundleSummary(
            kind=str(data["format"]),
            size=int(data.get("size") or 0),
            certificate=certificate if isinstance(certificate, CertificateSummary) else None,
            public_key_sha256=data.get("public_key_sha256"),
            error=data.get("error"),
        )
    if "public_key_sha256" in data:
        return KeySummary(data.get("public_key_sha256"), data.get("error"))
    if "size" in data:
        return OpaqueSummary(int(data["size"]))
    return CertificateSummary(
        subject=data.get("subject"),
        sans=tuple(data.get("sans") or ()),
        issuer=data.get("issuer"),
        serial=data.get("serial"),
        not_after=data.get("not_after"),
        sha256_fingerprint=data.get("sha256_fingerprint"),
        chain_length=int(data.get("chain_length") or 0),
        error=data.get("error"),
    )


def _meta_from_dicts(items: Sequence[Mapping[str, Any]]) -> tuple[MetaChange, ...]:
    return tuple(MetaChange(item["key"], item.get("old"), item.get("new")) for item in items)


def diff_from_dict(data: Mapping[str, Any]) -> SecretDiff:
    """Rebuild a :class:`SecretDiff` from its stored ``to_dict()`` form."""
    return SecretDiff(
        action=data["action"],
        namespace=str(data.get("namespace") or ""),
        name=str(data.get("name") or ""),
        unmanaged=bool(data.get("unmanaged")),
        immutable=bool(data.get("immutable")),
        old_type=data.get("old_type"),
        new_type=str(data.get("new_type") or ""),
        data=tuple(
            DataEntry(
                entry["key"],
                entry["change"],
                _summary_from_dict(entry.get("old")),
                _summary_from_dict(entry.get("new")),
            )
            for entry in data.get("data") or ()
        ),
        labels=_meta_from_dicts(data.get("labels") or ()),
        annotations=_meta_from_dicts(data.get("annotations") or ()),
        live_resource_version=data.get("live_resource_version"),
    )


def render_diff_dict(
    data: Mapping[str, Any], *, dry_run: bool = True, adopt_unmanaged: bool | None = None
) -> str:
    """The operator-readable diff text for a stored diff dict (no key material), followed by
    the Secret's consumers when the dry-run listed them."""
    text = render_diff(diff_from_dict(data), dry_run=dry_run, adopt_unmanaged=adopt_unmanaged)
    consumers = data.get("consumers")
    if isinstance(consumers, Mapping):
        text += "\n" + "\n".join(render_consumers(consumers_from_dict(consumers)))
    return text


def diff_summary(data: Mapping[str, Any] | None) -> str:
    """One line: what the write changes, e.g. ``update: tls.crt, tls.key (serial 01 -> 02)``."""
    if not data:
        return ""
    action = str(data.get("action"))
    if action == "unchanged":
        return "unchanged: the Secret already holds this certificate"
    changed = [
        str(entry["key"])
        for entry in data.get("data") or ()
        if entry.get("change") in ("added", "changed", "removed")
    ]
    text = f"{action}: {', '.join(changed) or 'metadata only'}"
    for entry in data.get("data") or ():
        if entry.get("key") == "tls.crt":
            old, new = entry.get("old") or {}, entry.get("new") or {}
            before, after = _short(old.get("serial")), _short(new.get("serial"))
            if before and before != after:
                text += f" (serial {before} -> {after})"
            elif after and not before:
                text += f" (serial {after})"
    if data.get("unmanaged"):
        text += "; the Secret was not created by CertAutoPilot"
    consumers = data.get("consumers")
    if isinstance(consumers, Mapping):
        restart = consumers_from_dict(consumers).restart_needed
        if restart:
            text += f"; {len(restart)} pod(s) need a restart to see it"
    return text


def _short(serial: object) -> str:
    """A serial number cut for tables (the full one is in the diff)."""
    text = str(serial or "")
    return text if len(text) <= 16 else text[:14] + "…"


# ------------------------------------------------------------------------------------ runs

_STATUS_STYLES = {
    ResultStatus.CREATED: "green",
    ResultStatus.UPDATED: "green",
    ResultStatus.ROLLED_BACK: "green",
    ResultStatus.UNCHANGED: "dim",
    ResultStatus.WOULD_CREATE: "cyan",
    ResultStatus.WOULD_UPDATE: "cyan",
    ResultStatus.FAILED: "bold red",
    ResultStatus.SKIPPED: "yellow",
    ResultStatus.PENDING: "blue",
    ResultStatus.RUNNING: "blue",
    ResultStatus.CURRENT: "green",
    ResultStatus.OUTDATED: "yellow",
    ResultStatus.DRIFTED: "bold red",
    ResultStatus.UNMANAGED: "magenta",
    ResultStatus.MISSING: "bold yellow",
}
_STATE_STYLES = {
    RunState.SUCCEEDED: "bold green",
    RunState.FAILED: "bold red",
    RunState.HALTED: "bold yellow",
    RunState.QUEUED: "blue",
    RunState.RUNNING: "blue",
}
_ACTION_WORDS = {
    "dry_run": "Dry-run",
    "execute": "Execute",
    "rollback": "Rollback",
    "audit": "Audit",
    "health_check": "Health check",
}


def status_words(status: str) -> str:
    """A status code as people read it in tables: ``would_update`` -> ``would update``.

    ``--output json/yaml`` keep the codes.
    """
    return status.replace("_", " ")


_CODES = re.compile(r"\b(?:" + "|".join(s.value for s in ResultStatus if "_" in s.value) + r")\b")


def reason_words(text: str) -> str:
    """A run's reason with its status codes in words (``6 would_update`` -> ``6 would update``)."""
    return _CODES.sub(lambda match: status_words(match.group(0)), text)


def status_text(status: str) -> Text:
    """A target status in words, coloured."""
    return plain(status_words(status), style=_STATUS_STYLES.get(ResultStatus(status), ""))


def run_headline(report: RunReport) -> Text:
    """``Execute run <id>: succeeded — succeeded: 4 updated`` with the state coloured."""
    line = plain(f"{_ACTION_WORDS.get(report.action, report.action)} run {report.id}: ")
    line.append_text(plain(report.state, style=_STATE_STYLES.get(RunState(report.state), "")))
    if report.reason:
        line.append_text(plain(f" — {reason_words(report.reason)}"))
    return line


def _details(result: TargetResultView) -> str:
    if result.status == ResultStatus.FAILED:
        return f"[{result.error_reason}] {result.error_message or ''}".strip()
    if result.status == ResultStatus.SKIPPED:
        return result.error_message or "skipped"
    if result.finding is not None:  # an audit's read
        detail = str(result.finding.get("detail") or "")
        if result.deployed_serial and result.deployed_not_after:
            detail += (
                f"; serial {_short(result.deployed_serial)}, not after "
                f"{_utc(result.deployed_not_after):%Y-%m-%d}"
            )
        return detail
    summary = diff_summary(result.diff)
    if result.resource_version and result.status in (
        ResultStatus.CREATED,
        ResultStatus.UPDATED,
        ResultStatus.ROLLED_BACK,
    ):
        summary = f"{summary}; resourceVersion {result.resource_version}".lstrip("; ")
    # Verify serving: one line per endpoint under the write's summary (a failed target's
    # not_serving message already carries them).
    return "\n".join([summary, *result.serving_lines()]) if result.serving else summary


def result_table(report: RunReport, *, title: str | None = None) -> Table:
    """The per-target table: batch, target, namespace/Secret, status and the reason."""
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("batch", justify="right")
    table.add_column("target")
    table.add_column("namespace/secret")
    table.add_column("status")
    table.add_column("details", overflow="fold")
    for result in report.results:
        where = (
            f"{result.namespace}/{result.secret_name}"
            if result.namespace and result.secret_name
            else (result.namespace or "-")
        )
        table.add_row(
            str(result.batch_index + 1),
            plain(result.target_name),
            plain(where),
            status_text(result.status),
            plain(_details(result)),
        )
    return table


def _progress_line(report: RunReport, total: int, done: int) -> str:
    if report.state == RunState.QUEUED:
        return "queued, waiting for a worker"
    batch = min(report.current_batch + 1, max(report.batches, 1))
    return f"batch {batch}/{report.batches}: {done}/{total} target(s) done"


def follow_run(
    fetch: Callable[[], RunReport],
    *,
    console: Console,
    timeout: float,
    total_hint: int = 0,
    poll_seconds: float = 0.5,
    queued_hint_after: float = 15.0,
) -> RunReport | None:
    """Poll a run until it finishes, showing a progress bar; None when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    hinted = False
    last_line = ""
    report = fetch()
    label = _ACTION_WORDS.get(report.action, report.action)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[batch]}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(label, total=total_hint or None, batch="")
        while True:
            # From the run's counts: the fetch may bring no per-target rows (a large run).
            total = report.target_count or total_hint
            done = sum(
                count for status, count in report.counts().items() if ResultStatus(status).is_final
            )
            line = _progress_line(report, total, done)
            progress.update(task, total=total or None, completed=done, batch=line)
            if not console.is_terminal and line != last_line:
                # Pipes and CI logs get one line per change instead of an animated bar.
                console.print(plain(f"  {label}: {line}"))
            last_line = line
            if report.finished:
                return report
            if (
                not hinted
                and report.state == RunState.QUEUED
                and time.monotonic() - started > queued_hint_after
            ):
                hinted = True
                progress.console.print(
                    f"  still queued after {queued_hint_after:.0f}s: is a worker running? "
                    "Start one with `certautopilot worker` (same CAP_* settings)."
                )
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_seconds)
            report = fetch()


def print_report(
    console: Console,
    report: RunReport,
    *,
    diffs: bool,
    adopting: Collection[str] | None = None,
) -> None:
    """A finished run: each target's diff (with ``diffs``), the table and the headline.

    ``adopting``: ids of the run's targets that adopt unmanaged Secrets (None: unknown), so a
    diff of an unmanaged Secret says what execute will do for its target.
    """
    if diffs:
        for result in report.results:
            console.print(
                Text.assemble(
                    "\n",
                    plain(result.target_name, style="bold"),
                    f" (batch {result.batch_index + 1}): ",
                    status_text(result.status),
                )
            )
            if result.diff:
                text = render_diff_dict(
                    result.diff,
                    dry_run=report.action == "dry_run",
                    adopt_unmanaged=None if adopting is None else result.target_id in adopting,
                )
                console.print(plain(text))
            elif result.error_message:
                console.print(plain(f"  [{result.error_reason}] {result.error_message}"))
        console.print()
    console.print(result_table(report))
    console.print(run_headline(report))
