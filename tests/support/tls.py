"""Self-signed certificates for tests of the gateway's HTTPS, made with the `openssl` command line.

cert, key = self_signed(tmp_path)    # for 127.0.0.1 and localhost; the certificate is its own CA
locked = encrypted(key, "pw")        # the same key, encrypted with a password
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str = "gateway") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, valid for a day, and its unencrypted key (P-256:
    made in milliseconds, where RSA keys take a while)."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is missing: scripts/install_test_deps.sh installs it"
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    command += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def encrypted(key: Path, password: str) -> Path:
    """`key` encrypted with `password` (AES-256), beside it."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is missing: scripts/install_test_deps.sh installs it"
    out = key.with_suffix(".encrypted.key")
    subprocess.run(
        [openssl, "pkey", "-in", str(key), "-aes256", "-passout", f"pass:{password}", "-out", str(out)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out
