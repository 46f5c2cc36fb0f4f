"""The command line: every bad input is one line of error and exit code 2, never a traceback; the
parsed arguments become the request they describe."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("pycocotools")

from clreg.onehead.cli import build_parser, main, request_from_args
from clreg.onehead.config import RunRequest


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "naive,foo"], "unknown method part"),
        (["--methods", "naive+ewc"], "cannot be combined"),
        (["--set", "ewc.lam"], "NAME=VALUE"),
        (["--set", "bogus=1"], "unknown setting"),
        (["--set", "ewc.lam=abc"], "not a number"),
        (["--seeds", "0"], "--seeds"),
        (["--data-root", "/nonexistent/data"], "no such folder"),
        (["--backbone-weights", "/nonexistent/w.pt"], "no such file"),
        (["evaluate", "--checkpoint", "/nonexistent.pt", "--data-root", "."], "checkpoint not found"),
    ],
)
def test_bad_inputs_give_a_message_and_exit_2(argv, message, capsys, tmp_path):
    argv = argv if argv[0] == "evaluate" else ["--profile", "tiny", "--out", str(tmp_path / "o"), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_root_and_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "mini_voc_seg").mkdir()
    assert main(["--profile", "tiny", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lacks" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad), "--data-root", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_the_parsed_command_line_is_the_request_it_describes():
    args = build_parser().parse_args(
        ["--profile", "tiny", "--methods", "ewc+lwf", "--seeds", "2", "--set", "ewc.lam=3", "--set", "lr=1e-3",
         "--no-joint", "--baselines-only", "--bn", "freeze", "--random-init"]
    )  # fmt: skip
    want = RunRequest(profile="tiny", methods="ewc+lwf", seeds=2, sets={"ewc.lam": 3.0, "lr": 1e-3}, joint=False,
                      mode="baselines", bn="freeze", random_init=True)  # fmt: skip
    assert request_from_args(args) == want
    assert request_from_args(build_parser().parse_args(["--tune"])).mode == "tune"


def test_tune_and_baselines_only_exclude_each_other(capsys, tmp_path):
    assert main(["--profile", "tiny", "--tune", "--baselines-only", "--out", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err
