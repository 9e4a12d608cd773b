"""The command line reads key=value overrides wherever they stand among a command's options."""
import pytest

from meshrl.cli import parse


def test_overrides_may_follow_options():
    args = parse(["plan", "x.yaml", "a=1", "--device", "cpu", "b=2", "--rates", "r.json", "c=3"])
    assert (args.command, args.config, args.overrides) == ("plan", "x.yaml", ["a=1", "b=2", "c=3"])
    assert (args.device, args.rates) == ("cpu", "r.json")
    args = parse(["bench", "x.yaml", "--iterations", "2", "run_dir=/tmp/b"])
    assert (args.iterations, args.overrides) == (2, ["run_dir=/tmp/b"])
    assert args.func.__module__ == "meshrl.planning.bench"


def test_an_unknown_command_or_option_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["plna", "x.yaml"])
    with pytest.raises(SystemExit):
        parse(["plan", "x.yaml", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_errors_are_reported_once_per_node_under_torchrun(tmp_path, monkeypatch, capsys):
    from meshrl.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: xyz\n")
    # the same config error on every rank: the first local rank of each node reports it
    for rank, local, shown in (("0", "0", "meshrl run: error: algorithm=xyz"), ("3", "3", None),
                               ("4", "0", "meshrl run (rank 4): error: algorithm=xyz")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        assert main(["run", str(bad)]) == 2
        err = capsys.readouterr().err
        assert (shown in err) if shown else err == "", (rank, err)
    # an error that may be this rank's own: every rank reports it, named
    import importlib
    plot = importlib.import_module("meshrl.engine.runtime.plot")

    def fails(args):
        raise ValueError("this rank's device is busy")
    monkeypatch.setattr(plot, "run", fails)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    assert main(["plot", str(tmp_path)]) == 2
    assert "meshrl plot (rank 3): error: this rank's device is busy" in capsys.readouterr().err
