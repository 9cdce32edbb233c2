"""Every ```python block of README.md runs as written against the demo folders."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


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


# Each block runs in a namespace of its own, in one interpreter (one JAX/torch start-up).
RUNNER = """
import sys
for i, block in enumerate(sys.argv[1:]):
    try:
        exec(compile(block, f"README block {i}", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"README python block {i} failed:\\n{block}", file=sys.stderr)
        raise
"""


@pytest.mark.slow
def test_every_readme_python_block_runs_against_the_demo_folders(demo):
    assert len(BLOCKS) >= 4
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",  # the mesh block needs 8
        "JAX_PLATFORMS": "cpu",
    }
    run([sys.executable, "-c", RUNNER, *BLOCKS], demo, env)
