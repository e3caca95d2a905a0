"""tools/audit.py (`make audit`): real pip-audit runs over a throw-away lock pinning jinja2 2.10, which has known advisories.

Each check runs against two vulnerability services:
  pypi  PyPI's JSON API on the network, what `make audit` asks (marked `network`: `make audit` runs them, `make test`
        does not): these fail, not skip, where https://pypi.org/pypi/NAME/VERSION/json cannot be reached, as the
        audit itself would (this workplace's PyPI mirror does not serve it);
  osv   a local stand-in for the OSV API (PIP_AUDIT_OSV_URL) serving two real jinja2 2.10 advisories: it checks
        tools/audit.py's own logic anywhere, offline.
"""
import datetime as dt
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT

AUDIT = ROOT / "tools" / "audit.py"
# jinja2 2.10 as containers/lock.py writes a lock line: pinned, with the sha256 of its wheel and sdist on PyPI.
VULNERABLE_LOCK = ("jinja2==2.10 --hash=sha256:74c935a1b8bb9a3947c50a54766a969d4846290e1e788ea44c1392163723c3bd "
                   "--hash=sha256:f84be1bb0040caca4cea721fcbbbbd61f9be9464ca236387158b0feea01914a4\n")
CLEAN_LOCK = "jinja2==3.1.6 --hash=sha256:85ece4451f492d0c13c5dd7c13a64681a86afae63a5f347908daf103ce6d2f67\n"
# CVE-2019-10906, the sandbox escape fixed in 2.10.1: on PyPI as PYSEC-2019-217, on OSV as GHSA-462w-v97r-4m45.
KNOWN = {"PYSEC-2019-217", "GHSA-462w-v97r-4m45", "CVE-2019-10906"}
TODAY = dt.date.today()
# What the local OSV stand-in knows: two of jinja2 2.10's real advisories, in OSV's schema.
OSV = {("jinja2", "2.10"): [
    {"id": "GHSA-462w-v97r-4m45", "aliases": ["CVE-2019-10906", "PYSEC-2019-217"], "summary": "Jinja2 sandbox escape",
     "affected": [{"package": {"name": "jinja2", "ecosystem": "PyPI"},
                   "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.10.1"}]}]}]},
    {"id": "GHSA-g3rq-g295-4j3m", "aliases": ["CVE-2020-28493", "PYSEC-2021-66"], "summary": "ReDoS in urlize",
     "affected": [{"package": {"name": "jinja2", "ecosystem": "PyPI"},
                   "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.11.3"}]}]}]},
]}


class OSVStandIn(BaseHTTPRequestHandler):
    "POST /v1/query {package: {name, ecosystem}, version} -> {vulns: [...]}, or {} (OSV's answer for none)."

    def do_POST(self):
        q = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        vulns = OSV.get((q["package"]["name"], q["version"]))
        body = json.dumps({"vulns": vulns} if vulns else {}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)

    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def osv_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OSVStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/query"
    server.shutdown(); server.server_close()


@pytest.fixture(scope="module", params=[pytest.param("pypi", marks=pytest.mark.network), "osv"])
def service(request):
    "(extra tools/audit.py arguments, environment) for each service."
    if request.param == "pypi": return [], {k: v for k, v in os.environ.items() if not k.startswith("PIP_AUDIT_")}
    return ["--service", "osv"], {**os.environ, "PIP_AUDIT_OSV_URL": request.getfixturevalue("osv_url")}


def audit(tmp_path, lock_text, accepted=(), service=([], os.environ)):
    "Run tools/audit.py on a lock holding `lock_text` with [[accept]] entries (id, package, until); the process."
    lock, accept = tmp_path / "requirements.lock", tmp_path / "audit-accept.toml"
    lock.write_text(lock_text)
    accept.write_text("".join(f'[[accept]]\nid = "{i}"\npackage = "{p}"\nreason = "test"\nuntil = "{u}"\n\n'
                              for i, p, u in accepted))
    args, env = service
    return subprocess.run([sys.executable, AUDIT, "--lock", lock, "--accept", accept, *args],
                          capture_output=True, text=True, env=env, timeout=120)


def reported(proc) -> dict[str, str]:
    "The primary id of each vulnerability tools/audit.py reported (failed or accepted): the rest of its line."
    found = re.findall(r"(?:VULNERABLE|accepted): \S+: jinja2==2\.10 (\S+)(.*)", proc.stdout + proc.stderr)
    assert found, f"no vulnerability reported (exit status {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return dict(found)


@pytest.fixture(scope="module")
def vulnerable(service, tmp_path_factory):
    "tools/audit.py on the jinja2 2.10 lock, nothing accepted: the process."
    return audit(tmp_path_factory.mktemp("vulnerable"), VULNERABLE_LOCK, service=service)


def test_vulnerable_lock_fails(vulnerable):
    out = vulnerable.stdout + vulnerable.stderr
    assert vulnerable.returncode == 1, out
    assert any(i in out for i in KNOWN), out
    assert re.search(r"VULNERABLE: \S+: jinja2==2\.10 .*fixed in: .*2\.10\.1", out), out
    assert "Traceback" not in out


def test_accepted_passes(vulnerable, service, tmp_path):
    ids = list(reported(vulnerable))
    proc = audit(tmp_path, VULNERABLE_LOCK, [(i, "Jinja2", TODAY) for i in ids], service)  # today is still accepted
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(reported(proc)) == ids and "VULNERABLE" not in proc.stdout and "stale" not in proc.stdout


def test_expired_acceptance_fails_naming_it(vulnerable, service, tmp_path):
    ids = reported(vulnerable)
    known = next(i for i, rest in ids.items() if any(k in i + rest for k in KNOWN))  # accepted no more
    yesterday, later = TODAY - dt.timedelta(days=1), TODAY + dt.timedelta(days=30)
    proc = audit(tmp_path, VULNERABLE_LOCK, [(i, "jinja2", yesterday if i == known else later) for i in ids], service)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = re.findall(r"VULNERABLE: .*", proc.stdout)
    assert len(failed) == 1 and known in failed[0] and f"expired on {yesterday}" in failed[0], proc.stdout


def test_stale_acceptance_warns(osv_url, tmp_path):
    service = (["--service", "osv"], {**os.environ, "PIP_AUDIT_OSV_URL": osv_url})  # a clean version, on the stand-in
    proc = audit(tmp_path, CLEAN_LOCK, [("GHSA-462w-v97r-4m45", "jinja2", TODAY)], service)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"warning: stale acceptance .*GHSA-462w-v97r-4m45", proc.stdout), proc.stdout


def test_unreachable_service_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = {**os.environ, "PIP_AUDIT_OSV_URL": f"http://127.0.0.1:{port}/v1/query"}
    proc = audit(tmp_path, VULNERABLE_LOCK, service=(["--service", "osv"], env))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reach the vulnerability service" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bad_accept_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.toml").write_text('[[accept]]\nid = "GHSA-462w-v97r-4m45"\npackage = "jinja2"\nuntil = "2030-01-01"\n')
    proc = subprocess.run([sys.executable, AUDIT, "--accept", tmp_path / "bad.toml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs exactly the keys" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_accept_file_parses():
    spec = importlib.util.spec_from_file_location("audit", AUDIT)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    for entry in module.load_accepted(module.ACCEPT):
        assert entry.reason and entry.until, entry
