"""deploy/systemd's units run commands that exist: each ExecStart parses with the real
argument parser of the process it starts (the broker's, the node supervisor's)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def exec_start(unit: Path) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    return shlex.split(parser["Service"]["ExecStart"])


def test_there_is_a_unit_for_the_broker_and_one_for_a_node() -> None:
    assert [u.name for u in UNITS] == ["orchestrator-broker.service",
                                       "orchestrator-node.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exec_start_parses_with_the_real_parser(unit: Path) -> None:
    argv = exec_start(unit)
    assert argv[0].endswith("/python") and argv[1] == "-m"
    module, args = argv[2], argv[3:]
    if module == "broker":
        from broker.__main__ import build_parser, config_from_args

        config = config_from_args(build_parser().parse_args(args))
        assert config.secure and config.advertise
    else:
        assert module == "nodes"
        from nodes.__main__ import parser

        parsed = parser().parse_args(args)
        assert parsed.broker.startswith("tcp://")
