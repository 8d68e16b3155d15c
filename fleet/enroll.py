"""Per-device MQTT credentials and the Mosquitto password file and ACL that confine each device to its own topics.

An enrollment directory holds everything the broker and the devices need::

    accounts.json         every account: role (device | controller), fleet, auth (password | cert)
    passwd                Mosquitto ``password_file`` (PBKDF2-SHA512, the ``$7$`` format mosquitto_passwd writes)
    acl                   Mosquitto ``acl_file``, rebuilt from accounts.json on every change
    mosquitto.conf        the lines to include in the broker's config (password/ACL files, client id = username)
    dynamic-security.json the same accounts and rules for Mosquitto's dynamic-security plugin, which also checks
                          subscriptions (``acl_file`` checks only deliveries; see below)
    mosquitto-dynsec.conf the lines to include instead of mosquitto.conf's to use the plugin
    ca/ca.pem, ca.key     the fleet CA (created by the first ``--cert`` enrollment)
    controllers/<name>/   a controller's credentials and ``share-group``: the secret shared-subscription group
    devices/<device>/     what to copy to the device: password or client.pem/client.key + ca.pem, agent-mqtt.toml

A device may publish only ``edgefleet/v1/<fleet>/<device>/{status,telemetry,events,reply}`` and read only its own
``cmd`` and ``receipt``; a controller reads every device's status/telemetry/events/reply (shared subscriptions
included) and writes every device's ``cmd`` and ``receipt``. Nobody reads ``$SYS``. ``use_username_as_clientid``
makes the broker use the authenticated name as the client id, so a client holding other credentials can never take
over a device's session by reusing its client id (with certificates, ``use_identity_as_username`` makes the
certificate's CN that name).

``acl_file`` grants every SUBSCRIBE and filters deliveries, so a device that joins the controllers' shared
subscription group is handed its round-robin share of their messages, which the read check then drops: a secret
share group per fleet keeps devices out. The dynamic-security configuration grants subscriptions explicitly (a device:
its own ``cmd`` and ``receipt``; a controller: its fleet's topics and its share group's filters), so the broker
refuses any other SUBSCRIBE. The plugin reads the file at start: restart the broker after enrolling (or manage the
running broker with ``mosquitto_ctrl dynsec``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.sdk import protocol
from edgefleet.sdk._fs import atomic_write_bytes, atomic_write_text
from edgefleet.sdk.errors import ConfigError, ProtocolError

__all__ = [
    "DEVICE_PUBLISH",
    "DEVICE_READ",
    "Enrollment",
    "acl_text",
    "dynsec_config",
    "enroll",
    "hash_password",
    "issue_certificate",
    "verify_password",
]

DEVICE_PUBLISH = ("status", "telemetry", "events", "reply")
DEVICE_READ = ("cmd", "receipt")
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default; the passwords are 32 random bytes, not guessable words
_ROLES = ("device", "controller")


@dataclass(frozen=True)
class Enrollment:
    """What one enrollment produced: the account and where its credentials were written."""

    name: str
    fleet: str
    role: str
    auth: str
    credentials_dir: Path
    password: str | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    share_group: str | None = None


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Check a password against a ``$7$`` hash (what the broker does at CONNECT)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(got, want)


def _account_acl(name: str, info: dict[str, str]) -> list[str]:
    fleet = info["fleet"]
    lines = [f"user {name}"]
    if info["role"] == "device":
        lines += [f"topic write {protocol.topic(fleet, name, ch)}" for ch in DEVICE_PUBLISH]
        lines += [f"topic read {protocol.topic(fleet, name, ch)}" for ch in DEVICE_READ]
    else:
        lines += [f"topic read {protocol.subscription(fleet, ch)}" for ch in DEVICE_PUBLISH]
        lines += [f"topic write {protocol.subscription(fleet, ch)}" for ch in DEVICE_READ]
    return lines


def acl_text(accounts: dict[str, dict[str, str]]) -> str:
    """The Mosquitto ACL file for these accounts (no anonymous section: anonymous clients get nothing)."""
    out = ["# edgefleet enrollment: generated from accounts.json, do not edit by hand", ""]
    for name in sorted(accounts):
        out += [*_account_acl(name, accounts[name]), ""]
    return "\n".join(out)


def _dynsec_acls(name: str, info: dict[str, str], share_group: str) -> list[dict[str, Any]]:
    fleet = info["fleet"]

    def allow(acltype: str, topics: list[str]) -> list[dict[str, Any]]:
        return [{"acltype": acltype, "topic": t, "allow": True} for t in topics]

    if info["role"] == "device":
        own = [protocol.topic(fleet, name, ch) for ch in DEVICE_READ]
        return (allow("publishClientSend", [protocol.topic(fleet, name, ch) for ch in DEVICE_PUBLISH])
                + allow("publishClientReceive", own) + allow("subscribeLiteral", own))
    reads = [protocol.subscription(fleet, ch) for ch in DEVICE_PUBLISH]
    shared = [protocol.subscription(fleet, ch, share_group) for ch in DEVICE_PUBLISH if ch != "status"]
    return (allow("publishClientSend", [protocol.subscription(fleet, ch) for ch in DEVICE_READ])
            + allow("publishClientReceive", reads)
            + allow("subscribePattern", [f"{protocol.ROOT}/{fleet}/#"]) + allow("subscribeLiteral", shared))


def dynsec_config(accounts: dict[str, dict[str, str]], passwd: dict[str, str],
                  fleets: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The dynamic-security plugin's JSON for these accounts: one role each, nothing allowed by default."""
    clients, roles = [], []
    for name in sorted(accounts):
        info = accounts[name]
        client: dict[str, Any] = {"username": name, "textName": f"edgefleet {info['role']}, fleet {info['fleet']}",
                                  "roles": [{"rolename": f"edgefleet-{name}"}]}
        parts = passwd.get(name, "").split("$")
        if len(parts) == 5 and parts[1] == "7":  # same PBKDF2-SHA512 hash, salt and iterations as the passwd file
            client.update(password=parts[4], salt=parts[3], iterations=int(parts[2]))
        clients.append(client)
        roles.append({"rolename": f"edgefleet-{name}",
                      "acls": _dynsec_acls(name, info, fleets.get(info["fleet"], {}).get("share_group", ""))})
    return {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                 "unsubscribe": True},
            "clients": clients, "groups": [], "roles": roles}


def _dynsec_plugin() -> str:
    import glob

    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob(
        "/usr/lib/mosquitto_dynamic_security.so") + glob.glob("/usr/local/lib/mosquitto_dynamic_security.so"))
    return found[0] if found else "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def _dynsec_conf(d: Path) -> str:
    return (
        "# include in mosquitto.conf instead of the password_file/acl_file lines (edgefleet enrollment)\n"
        "allow_anonymous false\n"
        f"plugin {_dynsec_plugin()}\n"
        f"plugin_opt_config_file {d / 'dynamic-security.json'}\n"
        "use_username_as_clientid true\n"
    )


def _broker_conf(d: Path) -> str:
    return (
        "# include in mosquitto.conf (edgefleet enrollment)\n"
        "allow_anonymous false\n"
        f"password_file {d / 'passwd'}\n"
        f"acl_file {d / 'acl'}\n"
        "# the authenticated name is the client id: nobody can take over another account's session\n"
        "use_username_as_clientid true\n"
        "# for a TLS listener with client certificates (enroll --cert), add to that listener:\n"
        f"#   cafile {d / 'ca' / 'ca.pem'}\n"
        "#   require_certificate true\n"
        "#   use_identity_as_username true\n"
    )


def _load_state(d: Path) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(accounts, fleets) from accounts.json."""
    f = d / "accounts.json"
    if not f.exists():
        return {}, {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        accounts, fleets = data["accounts"], data.get("fleets", {})
        if not isinstance(accounts, dict) or not isinstance(fleets, dict):
            raise TypeError("accounts and fleets must be objects")
        return {str(k): dict(v) for k, v in accounts.items()}, {str(k): dict(v) for k, v in fleets.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{f}: unreadable enrollment state: {exc}") from exc


def _load_passwd(d: Path) -> dict[str, str]:
    f = d / "passwd"
    if not f.exists():
        return {}
    out = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            user, _, hashed = line.partition(":")
            out[user] = hashed
    return out


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pem: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return pem


def _fleet_ca(d: Path, fleet: str) -> tuple[Any, Any]:
    """Load the fleet CA, creating it (EC P-256, 10 years) on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_dir = d / "ca"
    cert_f, key_f = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_f.exists() and key_f.exists():
        try:
            return (x509.load_pem_x509_certificate(cert_f.read_bytes()),
                    serialization.load_pem_private_key(key_f.read_bytes(), password=None))
        except ValueError as exc:
            raise ConfigError(f"{ca_dir}: unreadable fleet CA: {exc}") from exc
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(f"edgefleet {fleet} CA")).issuer_name(_name(
        f"edgefleet {fleet} CA")).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256()))
    atomic_write_bytes(key_f, _key_pem(key), mode=0o600)
    atomic_write_bytes(cert_f, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue_certificate(ca_cert: Any, ca_key: Any, common_name: str, *, server_names: tuple[str, ...] = (),
                      not_before: datetime.datetime | None = None, days: float = 365.0) -> tuple[bytes, bytes]:
    """A certificate signed by the fleet CA: a client certificate (CN = account name) or, with ``server_names``,
    a server certificate for those DNS names / IP addresses. Returns (cert PEM, key PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server_names:
        alt: list[x509.GeneralName] = []
        for n in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def enroll(out_dir: str | os.PathLike[str], name: str, fleet: str, *, cert: bool = False,
           role: str = "device") -> Enrollment:
    """Issue credentials for ``name`` (a device id or a controller account) and rewrite passwd, acl and conf.

    Enrolling an existing account again rotates its credentials (the old password or certificate is replaced;
    revoke a certificate by re-enrolling the device with a password, or removing it from the CA's trust).
    """
    try:
        protocol.check_id("device" if role == "device" else "account", name)
        protocol.check_id("fleet", fleet)
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from exc
    if role not in _ROLES:
        raise ConfigError(f"role must be one of {_ROLES}, got {role!r}")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    accounts, fleets = _load_state(d)
    # Mosquitto's acl_file does not check subscriptions, only deliveries: a device that joins the controllers'
    # shared-subscription group is handed its share of their messages, which the ACL then drops. A group name
    # nobody can guess keeps devices out of it (the controller runs with --share-group from its credentials dir).
    share_group = fleets.setdefault(fleet, {}).setdefault("share_group", f"edgefleet-{secrets.token_hex(16)}")
    old = accounts.get(name)
    if old is not None and (old["role"], old["fleet"]) != (role, fleet):
        raise ConfigError(f"account {name!r} is already enrolled as a {old['role']} of fleet {old['fleet']!r}; "
                          "names are unique across roles and fleets")
    creds = d / ("devices" if role == "device" else "controllers") / name
    creds.mkdir(parents=True, exist_ok=True)
    passwd = _load_passwd(d)
    result: Enrollment
    if cert:
        ca_cert, ca_key = _fleet_ca(d, fleet)
        cert_pem, key_pem = issue_certificate(ca_cert, ca_key, name)
        atomic_write_bytes(creds / "client.key", key_pem, mode=0o600)
        atomic_write_bytes(creds / "client.pem", cert_pem)
        atomic_write_bytes(creds / "ca.pem", (d / "ca" / "ca.pem").read_bytes())
        passwd.pop(name, None)  # a certificate account has no password to guess
        (creds / "password").unlink(missing_ok=True)
        result = Enrollment(name, fleet, role, "cert", creds, cert_file=creds / "client.pem",
                            key_file=creds / "client.key", ca_file=creds / "ca.pem")
        mqtt = ('[mqtt]\nurl = "mqtts://BROKER:8883"\nca_file = "ca.pem"\ncert_file = "client.pem"\n'
                'key_file = "client.key"\n')
    else:
        password = secrets.token_urlsafe(32)
        passwd[name] = hash_password(password)
        atomic_write_text(creds / "password", password + "\n", mode=0o600)
        result = Enrollment(name, fleet, role, "password", creds, password=password)
        mqtt = f'[mqtt]\nurl = "mqtt://BROKER:1883"\nusername = "{name}"\npassword = "{password}"\n'
    if role == "device":
        atomic_write_text(creds / "agent-mqtt.toml", f'[agent]\ndevice = "{name}"\nfleet = "{fleet}"\n\n{mqtt}',
                          mode=0o600)
    if role == "controller":
        atomic_write_text(creds / "share-group", share_group + "\n", mode=0o600)
        result = dataclasses.replace(result, share_group=share_group)
    accounts[name] = {"role": role, "fleet": fleet, "auth": result.auth}
    # The broker reads passwd and acl; write both before accounts.json so a crash never leaves an account that
    # accounts.json lists but the broker does not know (re-running enroll rewrites them all).
    atomic_write_text(d / "passwd", "".join(f"{u}:{h}\n" for u, h in sorted(passwd.items())), mode=0o640)
    atomic_write_text(d / "acl", acl_text(accounts), mode=0o640)
    atomic_write_text(d / "mosquitto.conf", _broker_conf(d.resolve()))
    atomic_write_text(d / "dynamic-security.json", json.dumps(dynsec_config(accounts, passwd, fleets), indent=1),
                      mode=0o600)
    atomic_write_text(d / "mosquitto-dynsec.conf", _dynsec_conf(d.resolve()))
    atomic_write_text(d / "accounts.json", json.dumps({"v": 1, "accounts": accounts, "fleets": fleets}, indent=1,
                                                      sort_keys=True), mode=0o600)
    return result
