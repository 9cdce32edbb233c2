"""Every ```python block of README.md and docs/*.md runs as written against the demo folders."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# (where, code): each block named by its page and its number there.
BLOCKS = [
    (f"{page.relative_to(ROOT)} block {i}", block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL))
]


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    process = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert process.returncode == 0, f"{command[0]}:\n{process.stdout}\n{process.stderr}"
    return process


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A working directory holding demo/ as `make demo` builds it."""
    cwd = tmp_path_factory.mktemp("readme")
    run([BIN / "mistral-tiny", "demo/mistral-tiny", "--weights", "trained-like"], cwd)
    run([BIN / "mistral-convert", "demo/mistral-tiny", "demo/mistral-tiny-jax"], cwd)
    return cwd


# Each block runs in a namespace of its own, in one interpreter (one JAX/torch start-up);
# arguments come in pairs: where the block is, then its code.
RUNNER = """
import sys
pairs = sys.argv[1:]
for where, block in zip(pairs[::2], pairs[1::2]):
    try:
        exec(compile(block, where, "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"python block of {where} failed:\\n{block}", file=sys.stderr)
        raise
"""


def test_the_docs_pages_hold_python_blocks():
    pages = {where.split(" block ")[0] for where, _ in BLOCKS}
    assert "README.md" in {page.name for page in PAGES}
    assert {"docs/generation.md", "docs/mesh.md", "docs/verification.md"} <= pages


@pytest.mark.slow
def test_every_python_block_of_the_docs_runs_against_the_demo_folders(demo):
    assert len(BLOCKS) >= 4
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",  # docs/mesh.md's block needs 8
        "JAX_PLATFORMS": "cpu",
    }
    run([sys.executable, "-c", RUNNER, *(part for pair in BLOCKS for part in pair)], demo, env)
