"""The `hyperalign` command: every registered subcommand builds its parser and shows help."""

import pytest

from reward.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"hyperalign {name}" in capsys.readouterr().out


def test_top_level_help_and_unknown(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["bogus"]) == 2
    assert "valid commands" in capsys.readouterr().err
