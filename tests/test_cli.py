"""The `qtsplus` console script: the quick-start command and one-line errors."""

import re
import subprocess
import sys


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "qtsplus_hf.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_runs_offline_and_reports_the_selection():
    result = run_cli("demo", "--keep-ratio", "0.25", "--temporal-patches", "8")
    assert result.returncode == 0, result.stderr
    kept, total = map(int, re.search(r"vision tokens kept: (\d+) of (\d+)", result.stdout).groups())
    assert (kept, total) == (32, 128)  # ceil(0.25 * 8 patches * 16 tokens)
    prefill = int(re.search(r"LM prefill length: (\d+)", result.stdout).group(1))
    stock = int(re.search(r"\(stock: (\d+)\)", result.stdout).group(1))
    assert stock - prefill == total - kept


def test_bad_argument_is_one_line_and_exit_code_2():
    result = run_cli("demo", "--keep-ratio", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--keep-ratio" in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("qtsplus-hf ")
