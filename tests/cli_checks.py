"""Checks the CLI tests share."""

import pytest


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


class Stopped(Exception):
    """Raised by `stop_midway`'s progress callback."""


def stop_midway(monkeypatch, args):
    """Runs `kl-rl ARGS` and stops it, as a kill would, once half its env steps are reported done
    (the checkpoints it wrote by then stay on disk)."""
    from kl_rl import runner
    from kl_rl.cli import main

    real_run = runner.run

    def stopping_run(*a, **kw):
        def progress(env_steps, total):
            if env_steps >= total // 2:
                raise Stopped

        return real_run(*a, **{**kw, "progress": progress})

    monkeypatch.setattr(runner, "run", stopping_run)
    with pytest.raises(Stopped):
        main(args)
    monkeypatch.setattr(runner, "run", real_run)
