"""megatron_fold at another git revision, importable beside the working tree's, in one process.

Why: a performance change is judged by its before and after timed side by side in one run (the same
machine noise hits both), which needs the code before the change and the code after it loaded at once.
`BaselinePackage("9d04e8e")` extracts that revision's `megatron_fold/` (git archive, no checkout) into a
temporary directory; `with baseline.active():` swaps the `megatron_fold*` entries of sys.modules for the
baseline's, so imports inside the block, at build time and at run time (modules imported lazily by a
function), resolve to the baseline's; outside it, to the working tree's. Objects built inside keep their
own classes either way; run them inside the block as well so their lazy imports find their own code.

Only the package moves: both copies share torch, megatron-core and the process groups, and the modules
named in `shared` (by default megatron_fold.cpu: CPU mode patches torch.cuda process-wide, so there is
one of it, the working tree's, or the baseline would find CPU mode off).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

__all__ = ["BaselinePackage"]

_PACKAGE = "megatron_fold"
_REPO = Path(__file__).resolve().parents[2]


def _ours(modules) -> list[str]:
    """The names of megatron_fold and its submodules among `modules` (a comprehension: sys.modules holds
    thousands of names and a swap runs per call of a benchmarked layer)."""
    prefix = _PACKAGE + "."
    return [name for name in modules if name == _PACKAGE or name.startswith(prefix)]


class BaselinePackage:
    """The `megatron_fold` package of git revision `rev` of the repository `repo` (this checkout by default)."""

    def __init__(self, rev: str, repo: str | Path = _REPO, shared: tuple[str, ...] = ("megatron_fold.cpu",)):
        self.shared = shared
        found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode:
            raise ValueError(f"baseline revision {rev!r} is not a commit of {repo}: {found.stderr.strip()}")
        self.rev, self.commit = rev, found.stdout.strip()
        archive = subprocess.run(["git", "-C", str(repo), "archive", self.commit, _PACKAGE], capture_output=True)
        if archive.returncode:
            raise ValueError(f"git archive {self.commit} {_PACKAGE}: {archive.stderr.decode().strip()}")
        self._directory = tempfile.TemporaryDirectory(prefix="mfold-baseline-")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(self._directory.name, filter="data")
        self.path = self._directory.name
        self._modules: dict[str, ModuleType] = {}
        self._depth = 0
        with self.active():
            package = importlib.import_module(_PACKAGE)
        if not str(Path(package.__file__).resolve()).startswith(str(Path(self.path).resolve())):
            raise RuntimeError(f"the baseline import of {_PACKAGE} found {package.__file__}, not {self.path}")

    @contextlib.contextmanager
    def active(self):
        """Imports of megatron_fold inside the block are the baseline's (re-entrant: an inner block
        changes nothing)."""
        if self._depth:
            yield self
            return
        self._depth += 1
        current = {name: sys.modules.pop(name) for name in _ours(sys.modules)}
        sys.modules.update(self._modules)
        sys.modules.update({name: current[name] for name in self.shared if name in current})
        sys.path.insert(0, self.path)
        try:
            yield self
        finally:
            self._modules = {name: sys.modules.pop(name) for name in _ours(sys.modules)}
            sys.path.remove(self.path)
            sys.modules.update(current)
            self._depth -= 1

    def module(self, name: str) -> ModuleType:
        """The baseline's module `name` (e.g. "megatron_fold.specs"), imported on first use."""
        with self.active():
            return importlib.import_module(name)

    def close(self) -> None:
        self._directory.cleanup()
