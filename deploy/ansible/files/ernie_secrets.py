#!/usr/bin/env python3
# ernie-mesh: the secrets the playbooks generate on the controller when the inventory (Vault)
# supplies none. Run by facts.yml and rotate-tokens.yml with the controller's Python (it needs
# PyYAML and cryptography, both dependencies of ansible-core).
"""Generated secrets and the Consul TLS CA, kept next to the inventory (<inventory dir>/ernie-secrets/).

secrets  --file F --need NAME... [--rotate NAME...]
    F (YAML, 0600, in a 0700 directory) holds one value per NAME; missing ones are generated
    (consul_encrypt_key: 32 random bytes, base64, as `consul keygen`; every other NAME: a UUID,
    the form Consul's ACL SecretIDs take), --rotate ones replaced. Existing values are kept:
    a second run changes nothing. Prints {"changed": bool, "secrets": {NAME: value}}.
tls      --dir D --datacenter DC --domain DOMAIN --server NAME=ADDRESS[@SERVERDC]... [--days N]
    D/ca.pem + D/ca-key.pem (EC P-256, 10 years) once; per server D/server-NAME.pem and
    -key.pem (server.SERVERDC.DOMAIN - SERVERDC defaults to DC -, NAME, localhost, 127.0.0.1,
    ADDRESS; server and client auth, as `consul tls cert create -server`), issued again when
    missing, when its names or CA changed, or within 30 days of expiry. Prints {"changed": bool,
    "ca": path, "servers": {...}}.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import secrets
import sys
import uuid
from pathlib import Path

import yaml

HEADER = (
    "# ernie-mesh secrets generated on the controller by deploy/ansible (facts.yml) for what the\n"
    "# inventory does not supply. Keep this file private (0600) and backed up; Ansible Vault is the\n"
    "# recommended home (docs/deploy.md, 'Secrets'). rotate-tokens.yml replaces the tokens here.\n"
)
RENEW_BEFORE = datetime.timedelta(days=30)


def private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def new_value(name: str) -> str:
    if name == "consul_encrypt_key":
        return base64.b64encode(secrets.token_bytes(32)).decode()
    if name.endswith("_api_key"):  # an API key, in the form `ernie-mesh keys add` makes them
        return "sk-ernie-" + secrets.token_urlsafe(32)
    return str(uuid.uuid4())


def cmd_secrets(args: argparse.Namespace) -> dict:
    path = Path(args.file)
    private_dir(path.parent)
    have: dict = {}
    if path.exists():
        have = yaml.safe_load(path.read_text()) or {}
        if not isinstance(have, dict):
            raise SystemExit(f"{path}: not a mapping of secret names to values")
    changed = False
    for name in args.need:
        if name in args.rotate or not have.get(name):
            have[name] = new_value(name)
            changed = True
    if changed or (path.stat().st_mode & 0o077 if path.exists() else True):
        body = yaml.safe_dump({k: have[k] for k in sorted(have)}, default_flow_style=False)
        write_private(path, (HEADER + body).encode())
    return {"changed": changed, "file": str(path), "secrets": {n: have[n] for n in args.need}}


# --- TLS --------------------------------------------------------------------------------------------


def expiry(cert) -> datetime.datetime:
    """not_valid_after, timezone-aware (cryptography < 42 has no not_valid_after_utc)."""
    utc = getattr(cert, "not_valid_after_utc", None)
    return utc if utc is not None else cert.not_valid_after.replace(tzinfo=datetime.UTC)


def cmd_tls(args: argparse.Namespace) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(args.dir)
    private_dir(d)
    now = datetime.datetime.now(datetime.UTC)
    changed = False

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_pem, ca_key_pem = d / "ca.pem", d / "ca-key.pem"
    if not ca_pem.exists() or not ca_key_pem.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ernie-mesh Consul CA ({args.domain})")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(ca_key_pem, pem_key(key))
        ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(ca_pem, 0o644)
        changed = True
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)

    servers = {}
    for spec in args.server:
        node, _, rest = spec.partition("=")
        address, _, datacenter = rest.partition("@")  # a server's own datacenter, else --datacenter
        dns = [f"server.{datacenter or args.datacenter}.{args.domain}", node, "localhost"]
        ips = sorted({"127.0.0.1", address} - {""})
        cert_path, key_path = d / f"server-{node}.pem", d / f"server-{node}-key.pem"
        servers[node] = {"cert": str(cert_path), "key": str(key_path)}
        if cert_path.exists() and key_path.exists():
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                same_names = sorted(san.get_values_for_type(x509.DNSName)) == sorted(dns) and sorted(
                    str(i) for i in san.get_values_for_type(x509.IPAddress)
                ) == sorted(ips)
            except x509.ExtensionNotFound:
                same_names = False
            if same_names and current.issuer == ca_cert.subject and expiry(current) - now > RENEW_BEFORE:
                continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=args.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
                ),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_private(key_path, pem_key(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_path, 0o644)
        changed = True
    return {"changed": changed, "ca": str(ca_pem), "servers": servers}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ernie_secrets.py", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("secrets")
    s.add_argument("--file", required=True)
    s.add_argument("--need", nargs="*", default=[])
    s.add_argument("--rotate", nargs="*", default=[])
    t = sub.add_parser("tls")
    t.add_argument("--dir", required=True)
    t.add_argument("--datacenter", required=True)
    t.add_argument("--domain", default="consul")
    t.add_argument("--server", nargs="*", default=[])
    t.add_argument("--days", type=int, default=825)
    args = p.parse_args(argv)
    out = cmd_secrets(args) if args.cmd == "secrets" else cmd_tls(args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
