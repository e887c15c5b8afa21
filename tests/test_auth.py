"""CurveZMQ on the pull endpoint with real keys made by `nexedge keys`."""

import json
import os
import shutil
import time

import pytest
import zmq

from nexedge.cli import main
from nexedge.relabel.pull import RemoteSource, pull
from nexedge.serve.auth import CurveClient, CurveConfig, load_secret
from nexedge.serve.pullserver import PullServer
from nexedge.store import SampleStore


@pytest.fixture()
def keys(tmp_path):
    d = str(tmp_path / "keys")
    for name in ("daemon", "alice", "mallory"):
        assert main(["keys", "--out", d, "--name", name]) == 0
    allowed = tmp_path / "allowed"
    (allowed / "pullers").mkdir(parents=True)
    shutil.copy(os.path.join(d, "alice.key"), allowed / "pullers")
    return d, str(allowed)


def _store(tmp_path, n=12):
    root = str(tmp_path / "store")
    with SampleStore(root) as st:
        for i in range(n):
            st.add(b"img%d" % i * 50, "png", {"camera": "c", "frame_id": str(i), "score": 0.5,
                                              "probs": {"good": 0.5, "bad": 0.5}, "kind": "band"})
    return root


def _pending(root):
    with SampleStore(root, writer=False) as st:
        return st.stats()["pending"]


def test_keys_command_writes_a_pair_and_refuses_to_overwrite(keys, capsys):
    d, _ = keys
    pub, sec = load_secret(os.path.join(d, "daemon.key_secret"))
    assert len(pub) == 40 and len(sec) == 40
    assert oct(os.stat(os.path.join(d, "daemon.key_secret")).st_mode & 0o777) == "0o600"
    assert main(["keys", "--out", d, "--name", "daemon"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["keys", "--out", d, "--name", "../evil"]) == 1


def test_allowed_client_pulls_others_get_nothing_and_are_counted(tmp_path, keys):
    d, allowed = keys
    root = _store(tmp_path)
    curve = CurveConfig(os.path.join(d, "daemon.key_secret"), allowed)
    srv = PullServer(root, "tcp://0.0.0.0:0", auth=curve).start()  # non-loopback is fine with auth
    ep = srv.endpoint.replace("0.0.0.0", "127.0.0.1")
    try:
        # unknown key: handshake denied by the ZAP handler; no reply, nothing acked
        mal = RemoteSource(ep, os.path.join(d, "mallory.key_secret"), os.path.join(d, "daemon.key"),
                           timeout_s=0.5, retries=1)
        with pytest.raises(RuntimeError, match="did not answer"):
            pull(mal, str(tmp_path / "mal"))
        mal.close()
        # plain client (no CURVE): handshake fails
        plain = RemoteSource(ep, timeout_s=0.5, retries=0)
        with pytest.raises(RuntimeError, match="did not answer"):
            pull(plain, str(tmp_path / "plain"))
        plain.close()
        time.sleep(0.3)
        counts = curve.counts()
        assert counts["unknown_key"] >= 1 and counts["handshake"] >= 1
        assert srv.refused == counts["total"] >= 2
        assert _pending(root) == 12 and srv.counters["requests"] == 0
        assert not os.listdir(str(tmp_path / "mal" / "images")) and not os.listdir(str(tmp_path / "plain" / "images"))
        # the allowed client gets everything
        ok = RemoteSource(ep, os.path.join(d, "alice.key_secret"), os.path.join(d, "daemon.key"), timeout_s=5)
        assert pull(ok, str(tmp_path / "ok"))["received"] == 12
        ok.close()
        assert _pending(root) == 0
        # revoking: remove alice's key from the allow-list; new connections are refused
        os.unlink(os.path.join(allowed, "pullers", "alice.key"))
        time.sleep(0.05)
        again = RemoteSource(ep, os.path.join(d, "alice.key_secret"), os.path.join(d, "daemon.key"),
                             timeout_s=0.5, retries=0)
        with pytest.raises(RuntimeError):
            again.hello()
        again.close()
    finally:
        srv.stop()
        curve.stop()


def test_raw_curve_client_with_wrong_server_key_is_refused(tmp_path, keys):
    d, allowed = keys
    root = _store(tmp_path, 2)
    curve = CurveConfig(os.path.join(d, "daemon.key_secret"), allowed)
    with PullServer(root, "tcp://127.0.0.1:*", auth=curve) as srv:
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.linger = 0
        # alice's own key, but she thinks the server is "mallory": handshake cannot complete
        CurveClient(os.path.join(d, "alice.key_secret"), os.path.join(d, "mallory.key")).apply_client(s)
        s.connect(srv.endpoint)
        s.send(json.dumps({"op": "hello"}).encode())
        assert s.poll(700) == 0
        s.close()
        ctx.term()
        assert srv.counters["requests"] == 0
    curve.stop()


def test_bad_key_files_give_clear_errors(tmp_path, keys):
    d, allowed = keys
    with pytest.raises(FileNotFoundError, match="nexedge keys"):
        CurveConfig(str(tmp_path / "nope.key_secret"), allowed)
    with pytest.raises(ValueError, match="only a public key"):
        CurveConfig(os.path.join(d, "daemon.key"), allowed)
    with pytest.raises(FileNotFoundError, match="allowed-clients"):
        CurveConfig(os.path.join(d, "daemon.key_secret"), str(tmp_path / "none"))
    with pytest.raises(ValueError, match="client-key"):
        RemoteSource("tcp://127.0.0.1:1", client_secret=os.path.join(d, "alice.key_secret"))


def test_keys_command_puts_a_client_key_in_its_role_folder_and_roles_hold(tmp_path, capsys):
    """Issue 30 item 5: any allowed key, a camera's included, could use every socket. `nexedge keys --role
    --allow` files a key under its role; the allow-list lets each role in where it belongs only."""
    d, allowed = str(tmp_path / "keys"), str(tmp_path / "allowed")
    assert main(["keys", "--out", d, "--name", "daemon"]) == 0
    for name, role in (("cam1", "camera"), ("puller1", "puller"), ("ops1", "operator")):
        assert main(["keys", "--out", d, "--name", name, "--role", role, "--allow", allowed]) == 0
        assert f"allowed as {role}" in capsys.readouterr().out
    assert main(["keys", "--out", d, "--name", "x", "--allow", allowed]) == 1  # --allow needs --role
    assert sorted(os.listdir(allowed)) == ["cameras", "operators", "pullers"]
    curve = CurveConfig(os.path.join(d, "daemon.key_secret"), allowed)
    key = {n: load_secret(os.path.join(d, n + ".key_secret"))[0] for n in ("cam1", "puller1", "ops1")}
    allow = curve._allow
    assert allow.callback("frames", key["cam1"]) and not allow.callback("frames", key["ops1"])
    assert allow.callback("pull", key["puller1"]) and not allow.callback("pull", key["cam1"])
    assert allow.callback("control", key["ops1"]) and not allow.callback("control", key["cam1"])
    assert all(allow.callback("verdicts", k) for k in key.values())
    assert curve.counts()["wrong_role"] == 3 and curve.key_name(key["ops1"].decode()) == "ops1"
