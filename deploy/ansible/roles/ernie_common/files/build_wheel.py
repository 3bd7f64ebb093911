#!/usr/bin/env python3
"""Build the ernie-mesh wheel from a checkout, on the controller; optionally a wheelhouse of its deps.

Prints one JSON object: {"wheel": path, "version": "...", "sha256": "...", "wheelhouse": dir or "",
"wheelhouse_tar": the wheelhouse packed in one reproducible tar (one file to copy), "wheelhouse_sha256"}.

- The source is copied to a staging directory first (the checkout gets no build/ or egg-info).
- The wheel is reproducible (SOURCE_DATE_EPOCH fixed): same sources, same bytes, so copying it to a
  host changes nothing when nothing changed (a second `site.yml` run reports changed=0).
- --wheelhouse DIR: every dependency as a wheel in DIR (built for the controller's platform and
  Python: use it when the hosts match, e.g. an air-gapped cluster). Tried offline first, so a filled
  wheelhouse needs no index at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# What a wheel needs from the checkout (pyproject decides what goes in).
SOURCES = ("pyproject.toml", "README.md", "agent", "bench", "envoy", "LICENSE")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "build")
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01: the oldest date a zip file can carry


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})},
    )


def build_wheel(src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ernie-wheel-") as tmp:
        stage = Path(tmp) / "src"
        stage.mkdir()
        for name in SOURCES:
            p = src / name
            if p.is_dir():
                shutil.copytree(p, stage / name, ignore=IGNORE)
            elif p.is_file():
                shutil.copy2(p, stage / name)
        dist = Path(tmp) / "dist"
        r = pip(
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(stage),
            env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
        )
        wheels = sorted(dist.glob("ernie_mesh-*.whl"))
        if r.returncode != 0 or not wheels:
            sys.exit(f"build_wheel: pip wheel failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
        target = out / wheels[0].name
        if not target.exists() or sha256(target) != sha256(wheels[0]):
            shutil.copyfile(wheels[0], target)  # only rewritten when the content changed
        return target


def requirements_key(wheel: Path) -> str:
    """What the wheel asks of its dependencies (Requires-Dist + Requires-Python + this Python)."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = [
            line for line in z.read(meta).decode().splitlines() if line.startswith(("Requires-", "Provides-Extra"))
        ]
    lines.append(f"{sys.implementation.cache_tag} {sys.platform}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def fill_wheelhouse(wheel: Path, wheelhouse: Path) -> None:
    wheelhouse.mkdir(parents=True, exist_ok=True)
    stamp = wheelhouse / ".requirements.sha256"
    key = requirements_key(wheel)
    if stamp.exists() and stamp.read_text().strip() == key and wheelhouse.with_suffix(".tar").exists():
        return  # same requirements as the last fill: nothing to resolve
    common = ("wheel", "-q", "-w", str(wheelhouse), "--find-links", str(wheelhouse), str(wheel))
    r = pip(*common[:1], "--no-index", *common[1:])
    if r.returncode != 0:  # something is missing: fetch it from the index
        r = pip(*common)
    if r.returncode != 0:
        sys.exit(f"build_wheel: could not fill the wheelhouse {wheelhouse}:\n{r.stdout}\n{r.stderr}")
    # The wheelhouse holds the dependencies only; the ernie-mesh wheel travels on its own.
    for own in wheelhouse.glob("ernie_mesh-*.whl"):
        own.unlink()
    pack(wheelhouse)
    stamp.write_text(key + "\n")


def pack(wheelhouse: Path) -> Path:
    """wheelhouse/ -> wheelhouse.tar, reproducible (sorted names, fixed times and owners): one file to copy."""
    target = wheelhouse.with_suffix(".tar")
    tmp = target.with_suffix(".tar.tmp")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = int(SOURCE_DATE_EPOCH), 0, 0, "", ""
        info.mode = 0o644
        return info

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(wheelhouse.glob("*.whl")):
            tar.add(f, arcname=f.name, filter=clean)
    if target.exists() and sha256(target) == sha256(tmp):
        tmp.unlink()
    else:
        os.replace(tmp, target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="the ernie-mesh checkout")
    ap.add_argument("--out", required=True, help="where the wheel goes")
    ap.add_argument("--wheelhouse", default="", help="also fill this wheelhouse with every dependency")
    args = ap.parse_args()
    src = Path(args.src).resolve()
    if not (src / "pyproject.toml").is_file():
        sys.exit(f"build_wheel: {src} is not an ernie-mesh checkout (no pyproject.toml)")
    wheel = build_wheel(src, Path(args.out))
    out = {
        "wheel": str(wheel),
        "version": wheel.name.split("-")[1],
        "sha256": sha256(wheel),
        "wheelhouse": "",
        "wheelhouse_tar": "",
        "wheelhouse_sha256": "",
    }
    if args.wheelhouse:
        wh = Path(args.wheelhouse).resolve()
        fill_wheelhouse(wheel, wh)
        tar = wh.with_suffix(".tar")
        out.update(wheelhouse=str(wh), wheelhouse_tar=str(tar), wheelhouse_sha256=sha256(tar))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
