"""``python -m tests.chaos``: bad arguments are refused before any server starts."""

from __future__ import annotations

import pytest

from tests.chaos.__main__ import main


def test_an_unknown_fault_kind_to_skip_is_refused_naming_the_kinds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--minutes", "1", "--seed", "1", "--skip", "reboot"]) == 2
    err = capsys.readouterr().err
    assert "cannot skip reboot" in err and "kinds that may be skipped: rollback" in err


@pytest.mark.parametrize(
    "argv", [["--minutes", "0"], ["--targets", "2"], ["--workers", "0"], ["--clusters", "0"]]
)
def test_sizes_that_cannot_make_a_round_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--targets >= 3" in capsys.readouterr().err


def test_an_env_setting_without_a_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--env", "CAP_STALE_AFTER"])
    assert exit_info.value.code == 2
    assert "--env takes KEY=VALUE" in capsys.readouterr().err
