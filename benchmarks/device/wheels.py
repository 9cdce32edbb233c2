"""Here, with pip reaching an index: download the wheels the device machine lacks into .whl/.

The lent GPU machine runs its own python3 (3.12, /opt/torch/.venv) and reaches no index. It
holds torch, JAX (CUDA 13), equinox, jaxtyping, safetensors, sentencepiece, click, tabulate,
tqdm, transformers, huggingface-hub, pytest, matplotlib, numpy, ml-dtypes, setuptools, ... but
not mistral-common nor its pydantic/jsonschema dependencies, nor beartype (the test suite's
`--jaxtyping-packages=...,beartype.beartype`). Those travel as cp312 manylinux wheels, pinned
below to the versions pip resolves for mistral-common[sentencepiece] on Python 3.12.

    python3 benchmarks/device/wheels.py            # or: make device-wheels

writes .whl/*.whl (installed there by benchmarks/device/run.sh) and .whl/fallback/*.whl
(installed there only where the image's own copy is older than a carried package needs), then
checks that every requirement of a carried wheel is carried too or is one the device holds,
and that the wheels fit the tool's 64 MiB per call beside the working tree.
"""

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
# What the device lacks (KINDS.md's package list for nvidia-h200 names none of these).
CARRIED = {
    "mistral-common": "1.13.1",  # the tokenizer library (pyproject: mistral-common[sentencepiece])
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "pydantic-extra-types": "2.11.1",  # mistral-common needs its [pycountry] extra
    "pycountry": "26.2.16",
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
    "beartype": "0.23.1",  # pytest addopts: --jaxtyping-packages=model_jax,beartype.beartype
}
# The device holds these, at a version not read there; pydantic 2.14 needs
# typing-extensions ≥ 4.16, so its wheel travels too and run.sh installs it only if needed.
FALLBACK = {"typing-extensions": "4.16.0"}
# Held by the device image (KINDS.md): a carried wheel may require these without carrying them.
# numpy is one on purpose: mistral-common pins numpy<2.4 on Python ≤ 3.12, the device has 2.5.2
# under torch and JAX; the pin is not honoured there (--no-deps) and deps.py says so.
DEVICE_HOLDS = {"attrs", "numpy", "pillow", "requests", "sentencepiece", "tiktoken"}
DEVICE_HOLDS |= set(FALLBACK)
# Extras of carried packages that we need (their requirements must be met too).
EXTRAS = {"mistral-common": {"sentencepiece"}, "pydantic-extra-types": {"pycountry"}}
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Python 3.12.3 on Linux x86-64: how markers are evaluated there.
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "os_name": "posix",
}
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on what travels per call, tree included


def download(pins: dict[str, str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]
    command += [arg for p in PLATFORMS for arg in ("--platform", p)]
    command += ["-q", "-d", str(dest), *(f"{name}=={version}" for name, version in pins.items())]
    subprocess.run(command, check=True)


def prune(dest: Path, pins: dict[str, str]) -> None:
    """Keep one wheel per pinned name at its pinned version (two versions stop the install)."""
    for wheel in dest.glob("*.whl"):
        name, version, *_ = parse_wheel_filename(wheel.name)
        if pins.get(canonicalize_name(name)) != str(version):
            print(f"removing {wheel.name} (not pinned)")
            wheel.unlink()


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    lines = re.findall(r"^Requires-Dist:(.*)$", text, re.M)
    return [Requirement(line.strip()) for line in lines]


def needed(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(DEVICE_ENV | {"extra": e}) for e in extras | {""})


def check_closure(dest: Path) -> list[str]:
    """Problems: a requirement of a carried wheel that is neither carried nor on the device."""
    carried = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in dest.glob("*.whl")}
    problems = []
    for name, wheel in sorted(carried.items()):
        for req in requirements(wheel):
            if not needed(req, EXTRAS.get(name, set())):
                continue
            dep = canonicalize_name(req.name)
            if dep in carried:
                version = parse_wheel_filename(carried[dep].name)[1]
                if not req.specifier.contains(version, prereleases=True):
                    problems.append(f"{name} needs {req}, carried {dep} {version}")
            elif dep not in DEVICE_HOLDS:
                problems.append(f"{name} needs {req}: neither carried nor on the device")
    return problems


def tree_bytes() -> int:
    """What travels besides .whl: tracked files and untracked files git does not ignore."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / p.decode() for p in listed.split(b"\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--check-only", action="store_true", help="download nothing")
    opts = parser.parse_args()
    fallback = opts.dest / "fallback"
    if not opts.check_only:
        download(CARRIED, opts.dest)
        download(FALLBACK, fallback)
    prune(opts.dest, CARRIED)
    prune(fallback, FALLBACK)
    problems = check_closure(opts.dest)
    wheels = sorted(opts.dest.rglob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.relative_to(opts.dest)}")
    tree = tree_bytes()
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB;")
    print(f"together {(size + tree) / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a call")
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in opts.dest.glob("*.whl")}
    missing = sorted(set(CARRIED) - have)
    problems += [f"{name}: no wheel downloaded" for name in missing]
    if size + tree > CARRY_LIMIT:
        problems.append("the wheels and the working tree exceed what one call carries")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
