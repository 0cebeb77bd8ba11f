"""The `hyperalign` command: every registered subcommand builds its parser and shows help."""

import pytest

from hyperalign.cli import COMMANDS, RENAMED, main


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


def test_renamed_commands_name_their_successor(capsys):
    for old, new in RENAMED.items():
        assert main([old]) == 2
        assert f"renamed to {new!r}" in capsys.readouterr().err


def test_user_errors_are_a_message_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["score", "--model", "tiny-random", "--prompt", "a", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "hyperalign score: error:" in err and str(missing) in err
    assert "Traceback" not in err
    with pytest.raises((FileNotFoundError, ValueError)):
        main(["score", "--debug", "--model", "tiny-random", "--prompt", "a", str(missing)])
