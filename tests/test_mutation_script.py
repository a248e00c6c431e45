"""scripts/mutation_check.py stays in step with the code: every mutation still applies (its text occurs once)."""

import importlib.util
import os

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location("mutation_check", os.path.join(ROOT, "scripts", "mutation_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_to_the_current_sources():
    script = load_script()
    for mutation in script.MUTATIONS:
        with open(os.path.join(ROOT, mutation.path), encoding="utf-8") as handle:
            assert handle.read().count(mutation.original) == 1, mutation.name


def test_an_unknown_mutation_is_a_usage_error(capsys):
    assert load_script().main(["--only", "no-such-mutation"]) == 2
    assert "unknown mutation" in capsys.readouterr().err


def test_a_stale_mutation_is_reported_not_applied(tmp_path):
    script = load_script()
    (tmp_path / "module.py").write_text("x = 1\n")
    stale = script.Mutation("stale", "module.py", "no such text anywhere", "y", "nothing")
    with pytest.raises(ValueError, match="occurs 0 times"):
        script.apply(stale, str(tmp_path))
    assert (tmp_path / "module.py").read_text() == "x = 1\n"
