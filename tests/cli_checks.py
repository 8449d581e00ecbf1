"""Checks the CLI tests share."""


def assert_one_line_error(capsys, code, *needles):
    """The CLI's contract for bad input: exit code 2 and one line on stderr, no traceback."""
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kl-rl: error: ")
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
