import os

import pytest

# Tests never touch the network: the hub client must not try either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run real-shape and long tests")
    parser.addoption(
        "--parity-report", action="store_true",
        help="print the error figures of every parity comparison (tests/parity.py) at the end",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--parity-report"):
        return
    from parity import MEASURED

    terminalreporter.section(f"parity: {len(MEASURED)} comparisons")
    for measured in MEASURED:
        terminalreporter.write_line(measured.line())
