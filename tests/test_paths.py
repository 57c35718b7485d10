"""Paths shared by the gateway and the root side of the image (slot-guard,
systemd units), defined once in firmware/lmgw/paths.env."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from lmgw import paths

TOP = Path(__file__).resolve().parents[1]
PATHS_ENV = TOP / "firmware" / "lmgw" / "paths.env"


def test_python_reads_paths_env_as_sh_does():
    names = re.findall(r"^([A-Z_0-9]+)=", PATHS_ENV.read_text(), re.M)
    script = f'. "{PATHS_ENV}"; ' + "; ".join(f'echo "{name}=${name}"' for name in names)
    sh = dict(line.split("=", 1) for line in subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                                                            check=True).stdout.splitlines())
    assert paths.parse(PATHS_ENV.read_text()) == sh
    assert paths.REBOOT_REQUEST == Path(sh["LMGW_REBOOT_REQUEST"]) and paths.UPDATE_PENDING.parent == paths.UPDATE_DIR


@pytest.mark.parametrize("line", ["LMGW_X=/a b", "LMGW_X=$(reboot)", "LMGW_X=${LMGW_UNDEFINED}/x", "lmgw_x=/a"])
def test_a_line_sh_would_read_otherwise_is_refused(line):
    with pytest.raises(ValueError, match="paths.env line 1"):
        paths.parse(line + "\n")


def code_text(file: Path) -> str:
    """What a file does, without its comments and docstrings (those may name a path to explain it)."""
    text = file.read_text(errors="replace")
    if file.suffix == ".py":
        tree = ast.parse(text)
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        return "\n".join(node.value for node in ast.walk(tree)
                         if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_no_other_file_spells_out_a_shared_path():
    # The units get the values substituted by board/lib.sh, slot-guard sources
    # the installed paths.env, the gateway imports lmgw.paths. /data/lmgw, the
    # account's home and the gateway's data_dir, is named in their own files.
    shared = {name: value for name, value in paths.parse(PATHS_ENV.read_text()).items()
              if value.startswith("/") and name != "LMGW_DATA_DIR"}
    sources = [f for tree in ("overlay", "firmware/lmgw", "board", "rootfs", "qemu/guest") for f in (TOP / tree).rglob("*")
               if f.is_file() and f != PATHS_ENV and f.suffix != ".pyc"]
    spelled = [(str(f.relative_to(TOP)), name) for f, code in ((f, code_text(f)) for f in sources)
               for name, value in shared.items() if value in code]
    assert spelled == []
