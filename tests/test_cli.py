"""The command line reads key=value overrides wherever they stand among a command's options."""
import pytest

from meshrl.cli import parse


def test_overrides_may_follow_options():
    args = parse(["plan", "x.yaml", "a=1", "--device", "cpu", "b=2", "--rates", "r.json", "c=3"])
    assert (args.command, args.config, args.overrides) == ("plan", "x.yaml", ["a=1", "b=2", "c=3"])
    assert (args.device, args.rates) == ("cpu", "r.json")
    args = parse(["bench", "x.yaml", "--iterations", "2", "run_dir=/tmp/b"])
    assert (args.iterations, args.overrides) == (2, ["run_dir=/tmp/b"])
    assert args.func.__module__ == "meshrl.engine.runtime.bench"


def test_an_unknown_command_or_option_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["plna", "x.yaml"])
    with pytest.raises(SystemExit):
        parse(["plan", "x.yaml", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
