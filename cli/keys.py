"""ZeroMQ CURVE: keypairs (`himac keys DIR`) and socket setup for both roles.

Layout of DIR: ``learner.key`` / ``learner.key_secret``, ``actor-N.key`` / ``actor-N.key_secret``,
and ``authorized/`` holding the public keys the learner accepts. With CURVE on, the learner's
sockets are CURVE servers and a ZAP authenticator admits only clients whose public key is in
``authorized/``: anything else is refused during the handshake, so none of its bytes reach the
learner's code. With CURVE off, the learner binds only where the config says and warns when
that is not loopback.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def generate_keys(directory: str, actors: int = 1) -> list[Path]:
    d = Path(directory)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    made = []
    for name in ["learner"] + [f"actor-{i + 1}" for i in range(actors)]:
        if not (d / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(d), name)
        made += [d / f"{name}.key", d / f"{name}.key_secret"]
        if name != "learner":
            shutil.copy(d / f"{name}.key", d / "authorized" / f"{name}.key")
    return made


@dataclass
class Curve:
    public: bytes
    secret: bytes
    server_public: bytes  # the learner's public key (clients need it)

    def server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


_authenticator = None


def curve_from_dir(directory: str | None, role: str, bind_host: str = "127.0.0.1", actor_key: str | None = None):
    """A Curve for ``role`` from DIR, or None (and a warning when the learner binds beyond loopback)."""
    global _authenticator
    if not directory:
        if role == "learner" and bind_host not in LOOPBACK:
            log.warning("learner binds %s without CURVE: anyone who can reach it can send it data "
                        "(use --curve-keys DIR, see `himac keys`)", bind_host)
        return None
    d = Path(directory)
    if role == "learner":
        server_public, server_secret = zmq.auth.load_certificate(str(d / "learner.key_secret"))
        if _authenticator is None:
            from zmq.auth.thread import ThreadAuthenticator

            _authenticator = ThreadAuthenticator(zmq.Context.instance())
            _authenticator.start()
            _authenticator.configure_curve(domain="*", location=str(d / "authorized"))
        return Curve(server_public, server_secret, server_public)
    # an actor needs only the learner's *public* key (never its secret) and its own keypair
    server_public, _ = zmq.auth.load_certificate(str(d / "learner.key"))
    name = actor_key or next((p.name[:-len(".key_secret")] for p in sorted(d.glob("actor*.key_secret"))), None)
    if name is None:
        raise FileNotFoundError(f"no actor keypair in {d} (run `himac keys {d}`)")
    public, secret = zmq.auth.load_certificate(str(d / f"{name}.key_secret"))
    return Curve(public, secret, server_public)
