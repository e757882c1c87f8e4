"""Run a script of scripts/ in the test's own process: its argument and machine checks need no fresh
interpreter (a subprocess imports torch and Megatron again, seconds of CPU per call)."""

import importlib.util
import pathlib

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def run_main(capsys, script: str, *args: str) -> tuple[int, str, str]:
    """scripts/<script>'s main(args): (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err
