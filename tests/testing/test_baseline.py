"""BaselinePackage: another revision's megatron_fold beside the working tree's, in one process. Checked on
a throwaway git repository whose `megatron_fold` differs between two commits (no dependence on this
clone's history, which CI may not have)."""

import subprocess
import sys

import pytest

import megatron_fold
from megatron_fold.testing.baseline import BaselinePackage


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def _commit(repo, value):
    package = repo / "megatron_fold"
    (package / "sub").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"VALUE = {value}\n")
    (package / "sub" / "__init__.py").write_text("")
    # A function that imports lazily: at run time inside active(), it must find its own revision.
    (package / "sub" / "lazy.py").write_text("def value():\n    import megatron_fold\n    return megatron_fold.VALUE\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", f"value {value}")
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_baseline_imports_beside_the_working_tree(tmp_path):
    _git(tmp_path, "init", "-q")
    first = _commit(tmp_path, 1)
    _commit(tmp_path, 2)
    before = {name: module for name, module in sys.modules.items() if name.startswith("megatron_fold")}
    baseline = BaselinePackage(first, repo=tmp_path)
    try:
        assert baseline.commit == first[:len(baseline.commit)]
        assert baseline.module("megatron_fold").VALUE == 1
        lazy = baseline.module("megatron_fold.sub.lazy")
        with baseline.active():
            assert lazy.value() == 1
            with baseline.active():  # nested: still the baseline, and still after the inner block
                assert lazy.value() == 1
            assert lazy.value() == 1
        # Outside the block, the working tree's package, untouched.
        import megatron_fold as current
        assert current is megatron_fold and not hasattr(current, "VALUE")
        assert {n: m for n, m in sys.modules.items() if n.startswith("megatron_fold")} == before
        assert "megatron_fold.sub" not in sys.modules
    finally:
        baseline.close()


def test_unknown_revision_is_named(tmp_path):
    _git(tmp_path, "init", "-q")
    _commit(tmp_path, 1)
    with pytest.raises(ValueError, match="baseline revision 'nosuchrev' is not a commit of"):
        BaselinePackage("nosuchrev", repo=tmp_path)
