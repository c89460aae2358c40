"""Every way an identity can prove who it is — an nkey, a client certificate (mTLS, ``verify_and_map``), a
``.creds`` file in operator mode (signed JWTs) — end to end on a real nats-server with two tenants: real engine and
router processes connect with their own key files (given by path in their environment), each tenant's client is
served, the grants of the matrix still hold, and a credential the deployment did not issue is refused."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import nats
import pytest

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import nats_server_binary
from busserve.bus.subjects import Subjects
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Final, GenerateRequest, SamplingParams, TokenChunk
from busserve.security.dev_tls import write_dev_tls
from busserve.security.issue import issue
from busserve.security.server_config import Credentials
from busserve.testing import ProcessCluster
from tests.faults.conftest import TINY_ENGINE, prompt, wait_router

pytestmark = pytest.mark.slow
S = Subjects()
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="mTLS files need openssl")


def _deployment(method: str, out: Path) -> tuple[Credentials, str, str | None]:
    """The issued identities, the server's TLS + auth config, and the CA (when TLS is on)."""
    creds = Credentials.for_stack(["A0"], ["r0"], clients=("alice@A", "bob@B"))
    tls, ca = "", None
    if method == "mtls":
        write_dev_tls(out, ["127.0.0.1", "localhost"])
        ca = str(out / "ca.pem")
        tls = (f'tls {{ cert_file: "{out}/server.pem", key_file: "{out}/server-key.pem", ca_file: "{ca}", '
               "verify_and_map: true }\n")
    issued, auth = issue(creds, method, S, out)
    return issued, tls + auth, ca


async def _refused_subscribe(cfg: BusConfig, subject: str) -> bool:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(**{**cfg.connect_kwargs(), "max_reconnect_attempts": 0}, error_cb=on_error)
    try:
        await nc.subscribe(subject)
        for _ in range(100):
            await nc.flush()
            if errors:
                break
            await asyncio.sleep(0.01)
    finally:
        await nc.close()
    return any("permissions violation" in e.lower() for e in errors)


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["nkey", pytest.param("mtls", marks=needs_openssl), "jwt"])
async def test_identities_by_key_serve_two_tenants(method: str, tiny_dir: Path, tiny: LoadedModel,
                                                   tmp_path: Path) -> None:
    creds, config, ca = _deployment(method, tmp_path)
    assert all(i.method == method and not i.password for i in creds.identities.values())
    with ProcessCluster(credentials=creds, auth=config, tls_ca=ca, log_dir=str(tmp_path)) as c:
        c.start_engine("A0", "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        await asyncio.to_thread(c.wait_engines, {"A0"})
        alice = await Bus.connect(c.bus_config("alice"), name="alice")
        bob = await Bus.connect(c.bus_config("bob"), name="bob")
        try:
            await wait_router(alice)
            for bus, label in ((alice, "a-1"), (bob, "b-1")):
                req = GenerateRequest(request_id=label, prompt_token_ids=prompt(tiny, 12, len(label)),
                                      sampling=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
                events = [e async for e in bus.generate(req, first_event_timeout_s=60)]
                assert isinstance(events[-1], Final) and events[-1].finish_reason == "length", events[-1]
                assert sum(len(e.token_ids) for e in events if isinstance(e, TokenChunk)) == 5
            # The grants travel with the identity whatever proves it (in operator mode: inside the signed JWT).
            assert await _refused_subscribe(c.bus_config("alice"), "_INBOX.>")
            assert await _refused_subscribe(c.bus_config("A0"), f"{S.root}.generate.*")
        finally:
            await alice.close()
            await bob.close()
        for log in tmp_path.glob("*.log"):
            text = log.read_text(errors="replace")
            assert "ermissions violation" not in text, f"{log.name} was refused something it needs:\n{text[-3000:]}"

        # A credential of the same kind that this deployment did not issue gets no connection.
        other, _, _ = _deployment(method, tmp_path / "elsewhere") if method != "mtls" else (None, "", None)
        if other is not None:
            foreign = other.identities["alice"].bus_config(BusConfig(servers=[c.url], connect_attempts=1,
                                                                      connect_timeout_s=2))
        else:
            out = tmp_path / "elsewhere"
            out.mkdir()
            write_dev_tls(out, ["127.0.0.1"])  # another CA
            foreign_creds, _ = issue(Credentials.for_stack(["x"], ["y"], clients=("alice@A",)), "mtls", S, out)
            foreign = foreign_creds.identities["alice"].bus_config(
                BusConfig(servers=[c.url], connect_attempts=1, connect_timeout_s=2, tls_ca=ca))
        with pytest.raises(ConnectionError):
            await Bus.connect(foreign, name="intruder")


def test_operator_mode_config_is_valid_and_holds_no_user_secret(tmp_path: Path) -> None:
    creds, config, _ = _deployment("jwt", tmp_path)
    conf = tmp_path / "server.conf"
    conf.write_text(config)
    checked = subprocess.run([str(nats_server_binary()), "-t", "-c", str(conf)], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    for ident in creds.identities.values():
        text = Path(str(ident.creds_file)).read_text()
        assert "BEGIN NATS USER JWT" in text and "BEGIN USER NKEY SEED" in text
        assert oct(Path(str(ident.creds_file)).stat().st_mode & 0o777) == "0o600"
        seed = text.split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
        assert seed.startswith("SU") and seed not in config
