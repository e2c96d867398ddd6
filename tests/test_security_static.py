"""Static checks over the project's own code: nothing that can execute supplied data.

Walks the AST of every Python file we ship (app, pages, cxr_core, scripts): no
``torch.load`` without ``weights_only=True``, no pickle/marshal/shelve loads, no
``eval``/``exec``, no ``subprocess`` with ``shell=True``, no ``yaml.load``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([ROOT / "app.py", *(ROOT / "pages").glob("*.py"), *(ROOT / "cxr_core").rglob("*.py"), *(ROOT / "scripts").glob("*.py")])


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def problems_in(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in {"eval", "exec", "compile"} or name.split(".")[-1] in {"loads", "load", "Unpickler"} and name.split(".")[0] in {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}:
            found.append(f"line {node.lineno}: {name}")
        if name in {"yaml.load", "yaml.unsafe_load"}:
            found.append(f"line {node.lineno}: {name}")
        if name.startswith("subprocess.") or name in {"os.system", "os.popen"}:
            shell = keywords.get("shell")
            if name in {"os.system", "os.popen"} or (isinstance(shell, ast.Constant) and shell.value):
                found.append(f"line {node.lineno}: {name} through a shell")
    return found


def test_the_checker_catches_what_it_looks_for() -> None:
    bad = "import torch, pickle, subprocess\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\neval('1')\nsubprocess.run('ls', shell=True)\n"
    assert len(problems_in(bad)) == 5
    assert problems_in("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\nmodel.eval()\n") == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_execution_from_data(path: Path) -> None:
    assert problems_in(path.read_text(encoding="utf-8")) == []


def test_no_secrets_tracked() -> None:
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [t for t in tracked if t.endswith(("secrets.toml", "users.json", ".pem", ".key")) or t.startswith("var/")]
