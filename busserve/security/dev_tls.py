"""A CA, a server certificate and client certificates for a development deployment or a test (openssl; not a
PKI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def write_dev_tls(out: Path, hosts: list[str], days: int = 365) -> None:
    """``ca.pem``/``ca-key.pem`` and ``server.pem``/``server-key.pem`` for ``hosts`` (names or IPs) in ``out``;
    the keys 0600."""
    if shutil.which("openssl") is None:
        raise SystemExit("TLS files need the openssl command")

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=out, check=True, capture_output=True, timeout=120)

    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem", "-days",
        str(days), "-subj", "/CN=busserve-dev-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out", "server.csr",
        "-subj", f"/CN={hosts[0]}")
    (out / "san.ext").write_text(f"subjectAltName={san}\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-out", "server.pem", "-days", str(days), "-extfile", "san.ext")
    for key in ("ca-key.pem", "server-key.pem"):
        os.chmod(out / key, 0o600)


def write_client_cert(out: Path, name: str, days: int = 365) -> tuple[Path, Path]:
    """A client certificate for identity ``name`` (subject ``CN=<name>``, for ``verify_and_map``), signed by the CA
    ``write_dev_tls`` made in ``out``: ``clients/<name>.pem`` and its key (0600)."""
    folder = out / "clients"
    folder.mkdir(exist_ok=True)
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}-key.pem", folder / f"{name}.csr"

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=out, check=True, capture_output=True, timeout=120)

    # P-256: a key per identity in milliseconds (RSA takes a good part of a second each)
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
        "-out", str(csr), "-subj", f"/CN={name}")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-out", str(cert), "-days", str(days), "-extfile", str(folder / "client.ext"))
    os.chmod(key, 0o600)
    csr.unlink()
    return cert.resolve(), key.resolve()
