"""There, after run.sh installed the carried wheels into SITE: meet what they need, offline.

For every requirement of a package installed in SITE (extras we use included), look at the
version the machine now imports (SITE first, then the image). A fallback wheel in
.whl/fallback/ is installed into SITE only where the image's copy is missing or too old;
any other unmet requirement is printed as a note (numpy<2.4 of mistral-common is expected:
the image's numpy 2.5.2 serves torch and JAX and stays). Exit 1 if something is missing
outright, else 0. Needs nothing but the image's `packaging` and pip.

    python3 benchmarks/device/deps.py /tmp/site .whl/fallback
"""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

EXTRAS = {"mistral-common": {"sentencepiece"}, "pydantic-extra-types": {"pycountry"}}


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def unmet(site: Path) -> list[tuple[str, Requirement, str | None]]:
    """(carried package, requirement, version found or None) for each requirement not met."""
    problems = []
    for dist in md.distributions(path=[str(site)]):
        name = canonicalize_name(dist.metadata["Name"])
        extras = EXTRAS.get(name, set()) | {""}
        for line in dist.requires or []:
            req = Requirement(line)
            marker = req.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in extras):
                continue
            found = installed_version(req.name)
            if found is None or not req.specifier.contains(found, prereleases=True):
                problems.append((name, req, found))
    return problems


def main() -> None:
    site, fallback = Path(sys.argv[1]), Path(sys.argv[2])
    wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in fallback.glob("*.whl")}
    chosen = {}
    for _, req, _ in unmet(site):
        wheel = wheels.get(canonicalize_name(req.name))
        if wheel and req.specifier.contains(parse_wheel_filename(wheel.name)[1], prereleases=True):
            chosen[wheel.name] = wheel
    if chosen:
        print(f"deps: the image's copies are too old; installing {', '.join(sorted(chosen))}")
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        command += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
        subprocess.run([*command, *map(str, chosen.values())], check=True)
    missing = False
    for name, req, found in unmet(site):
        print(f"deps: note: {name} wants {req}, the machine has {found or 'nothing'}")
        missing |= found is None
    for name in ("mistral-common", "pydantic", "pydantic-core", "beartype", "typing-extensions"):
        print(f"deps: {name} {installed_version(name)}")
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
