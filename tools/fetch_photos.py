"""Fetch the real photographs of tools/photos.py from Debian packages (install-time step, `make photos`).

For each package in tools/photos.py.DEBIAN_PHOTOS: `apt-get download` the .deb (no root needed, but the
apt lists must exist: run `apt-get update` once as root if apt says it cannot locate a package),
unpack it with `dpkg-deb -x` into a temporary folder, and keep only the listed photographs under
data/photos/debian/<package>/ (or $FXQ_PHOTOS_DIR/debian/). The .debs themselves are not kept.
Then it cuts the crops once and caches them (data/photos/crops_<size>.npz), and prints how many
photos and crops each split has.

    python tools/fetch_photos.py [--dest DIR] [--no-cache] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


import photos  # noqa: E402


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit(f"error: `{cmd[0]}` not found; the photos come from Debian packages, so this step "
                 f"needs a Debian-based system with apt-get and dpkg-deb")
    if res.returncode != 0:
        hint = ""
        if cmd[0] == "apt-get" and ("Unable to locate" in res.stderr or "no installation candidate" in res.stderr):
            hint = "\nhint: the apt package lists are missing or stale; run `apt-get update` (as root) and retry"
        sys.exit(f"error: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr.strip()}{hint}")
    return res.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_package(package: str, root: str, files: tuple[str, ...], dest: Path, force: bool) -> dict:
    out_dir = dest / package
    targets = [out_dir / rel for rel in files]
    manifest_entry = dest / f"{package}.json"
    if not force and manifest_entry.is_file() and all(t.is_file() for t in targets):
        print(f"{package}: already there ({len(files)} photos)")
        return json.loads(manifest_entry.read_text())
    with tempfile.TemporaryDirectory(prefix="fxq-photos-") as tmp:
        tmp = Path(tmp)
        _run(["apt-get", "download", package], cwd=tmp)
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            sys.exit(f"error: expected one {package}_*.deb after apt-get download, found {debs}")
        deb = debs[0]
        version = _run(["dpkg-deb", "-f", str(deb), "Version"], cwd=tmp).strip()
        size = deb.stat().st_size
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], cwd=tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        entry = {"package": package, "version": version, "deb_bytes": size, "files": {}}
        for rel, target in zip(files, targets):
            src = tmp / "x" / root / rel
            if not src.is_file():
                sys.exit(f"error: {package} {version} has no {root}/{rel}; tools/photos.py.DEBIAN_PHOTOS "
                         f"needs updating for this version")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            entry["files"][rel] = _sha256(target)
    manifest_entry.write_text(json.dumps(entry, indent=1) + "\n")
    print(f"{package} {version}: {len(files)} photos ({size / 1e6:.1f} MB download)")
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None,
                    help="photo data dir (default: $FXQ_PHOTOS_DIR or <repo>/data/photos)")
    ap.add_argument("--no-cache", action="store_true", help="do not build the crop cache")
    ap.add_argument("--force", action="store_true", help="download again even if the photos are there")
    args = ap.parse_args(argv)
    if args.dest is not None:
        os.environ["FXQ_PHOTOS_DIR"] = str(args.dest.resolve())
    dest = photos.debian_dir()
    dest.mkdir(parents=True, exist_ok=True)
    entries = [fetch_package(pkg, root, files, dest, args.force)
               for pkg, (root, files) in photos.DEBIAN_PHOTOS.items()]
    (dest / photos.MANIFEST).write_text(json.dumps(entries, indent=1) + "\n")
    photos.photo_sources()  # every listed photo, including the pip-bundled ones, is present
    if not args.no_cache:
        path = photos.build_cache(force=args.force)
        print(f"crops cached in {path}")
        for split, counts in photos.summary().items():
            print(f"{split}: {counts['photos']} photos, {counts['crops']} crops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
