"""Audit the serving images' dependency locks for known vulnerabilities (pip-audit), with a list of accepted ones.

For each lock (default: containers/serve/requirements.lock and containers/serve-gpu/requirements.lock, written by
containers/lock.py: every distribution pinned with `==` and hashed), runs

    python -m pip_audit -r LOCK --disable-pip -s pypi -f json --aliases on ...

which reads the pins from the file (hashed, so pip-audit takes them as resolved: --no-deps is not needed) and asks
the vulnerability service about each: pip is not run, nothing is resolved, downloaded or installed. The default
service is PyPI's JSON API (https://pypi.org/pypi/NAME/VERSION/json); `--service osv` asks api.osv.dev (or
$PIP_AUDIT_OSV_URL) instead.

Accepted vulnerabilities are listed in containers/audit-accept.toml, one [[accept]] table each:

    [[accept]]
    id = "GHSA-xxxx-xxxx-xxxx"    # or PYSEC-..., CVE-...: matches the advisory's id or any of its aliases
    package = "jinja2"
    reason = "why it does not affect the serving path, or what is waiting on the fix"
    until = "2027-01-31"          # accepted through this date; after it, the vulnerability fails the check again

A vulnerability fails the check unless an entry with its id (or an alias) and its package accepts it and its `until`
is today or later; a failure found only by an expired entry names that entry. An entry that matches nothing in any
lock audited is reported as stale (a warning: delete it). So the matching is done here, on pip-audit's full report,
rather than with its --ignore-vuln, which would hide what an entry matched (and ignores an id in any package).

Exit status: 0 when every vulnerability found is accepted; 1 when one is not (each printed with its package,
version, id, aliases and fix versions); 2 when the audit itself could not be done: the service unreachable,
a dependency the service has no record of (pip-audit would skip it, and pass), a bad lock or accept file.

    python tools/audit.py                      (make audit)
    python tools/audit.py --lock some/requirements.lock --accept some/accept.toml
"""
import argparse
import datetime as dt
import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = [ROOT / "containers" / "serve" / "requirements.lock", ROOT / "containers" / "serve-gpu" / "requirements.lock"]
ACCEPT = ROOT / "containers" / "audit-accept.toml"
KEYS = {"id", "package", "reason", "until"}
# What pip-audit (or requests under it) says when it cannot reach the service; it prints some of these as tracebacks.
UNREACHABLE = ("ConnectionError", "Could not connect", "NameResolutionError", "Max retries exceeded", "ConnectTimeout",
               "ReadTimeout", "not redirecting properly", "network may be blocking")


class AuditError(Exception):
    "The audit could not be done (exit status 2)."


@dataclass(frozen=True)
class Accepted:
    id: str
    package: str
    reason: str
    until: dt.date


@dataclass(frozen=True)
class Vuln:
    lock: str
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fix_versions: tuple[str, ...]

    def ids(self) -> set[str]: return {self.id, *self.aliases}

    def __str__(self):
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        fixes = ", ".join(self.fix_versions) or "none yet"
        return f"{self.lock}: {self.package}=={self.version} {self.id}{aliases}; fixed in: {fixes}"


def rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_accepted(path: Path) -> list[Accepted]:
    "The [[accept]] entries of `path` (none when it does not exist)."
    if not path.exists(): return []
    try: data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e: raise AuditError(f"{rel(path)}: not valid TOML: {e}")
    unknown = set(data) - {"accept"}
    if unknown: raise AuditError(f"{rel(path)}: unknown top-level keys {sorted(unknown)}: entries go in [[accept]] tables")
    entries = []
    for i, entry in enumerate(data.get("accept", []), 1):
        where = f"{rel(path)}: [[accept]] entry {i}"
        if not isinstance(entry, dict) or set(entry) != KEYS:
            raise AuditError(f"{where}: needs exactly the keys {sorted(KEYS)}, has {sorted(entry) if isinstance(entry, dict) else entry}")
        until = entry["until"]
        if isinstance(until, str):
            try: until = dt.date.fromisoformat(until)
            except ValueError: raise AuditError(f"{where}: until = {entry['until']!r} is not a YYYY-MM-DD date")
        if not isinstance(until, dt.date) or isinstance(until, dt.datetime):
            raise AuditError(f"{where}: until = {entry['until']!r} is not a YYYY-MM-DD date")
        if not all(isinstance(entry[k], str) and entry[k].strip() for k in ("id", "package", "reason")):
            raise AuditError(f"{where}: id, package and reason must be non-empty strings")
        entries.append(Accepted(entry["id"].strip(), canonicalize_name(entry["package"]), entry["reason"].strip(), until))
    return entries


def pip_audit(lock: Path, service: str) -> list[Vuln]:
    "Every known vulnerability of the distributions pinned in `lock`, as the service reports them."
    if not lock.is_file(): raise AuditError(f"{rel(lock)}: no such lock")
    cmd = [sys.executable, "-m", "pip_audit", "-r", str(lock), "--disable-pip", "-s", service, "-f", "json",
           "--aliases", "on", "--desc", "off", "--progress-spinner", "off"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    try: report = json.loads(p.stdout)
    except json.JSONDecodeError: report = None
    if p.returncode not in (0, 1) or report is None:  # 1 is "found vulnerabilities", with the report on stdout
        if any(s in p.stderr for s in UNREACHABLE):
            raise AuditError(f"cannot reach the vulnerability service ({service}): check the network, or try --service "
                             f"{'osv' if service == 'pypi' else 'pypi'}\n  {last_line(p.stderr)}")
        raise AuditError(f"pip-audit failed on {rel(lock)} (exit status {p.returncode}); it said:\n  {last_line(p.stderr)}\n"
                         f"  (the lock must pin every distribution with == and a --hash: `make lock` writes it so)")
    skipped = [d for d in report["dependencies"] if "skip_reason" in d]
    if skipped and len(skipped) == len(report["dependencies"]):
        raise AuditError(f"{rel(lock)}: the vulnerability service ({service}) has no record of any distribution in it "
                         f"({len(skipped)}), so nothing was audited; pip-audit says, of the first:\n"
                         f"  {skipped[0]['skip_reason']}"
                         + ("\n  (is pypi.org a mirror that does not serve https://pypi.org/pypi/NAME/VERSION/json? "
                            "try --service osv)" if service == "pypi" else ""))
    if skipped:
        raise AuditError(f"{rel(lock)}: {len(skipped)} of its {len(report['dependencies'])} distributions could not be "
                         f"audited (pip-audit would skip them, and pass):\n"
                         + "\n".join(f"  {d['name']}: {d['skip_reason']}" for d in skipped))
    return [Vuln(rel(lock), d["name"], d["version"], v["id"], tuple(v.get("aliases", ())), tuple(v["fix_versions"]))
            for d in report["dependencies"] for v in d["vulns"]]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", action="append", type=Path, metavar="PATH",
                        help="a requirements lock to audit (repeatable; default: containers/serve*/requirements.lock)")
    parser.add_argument("--accept", type=Path, default=ACCEPT, metavar="PATH",
                        help=f"the accepted vulnerabilities (default: {rel(ACCEPT)})")
    parser.add_argument("--service", choices=("pypi", "osv"), default="pypi",
                        help="pip-audit's vulnerability service (default: pypi; osv uses $PIP_AUDIT_OSV_URL if set)")
    args = parser.parse_args(argv)
    locks, today = args.lock or LOCKS, dt.date.today()
    try:
        accepted = load_accepted(args.accept)
        found = [v for lock in locks for v in pip_audit(lock, args.service)]
    except AuditError as e:
        print(f"audit: ERROR: {e}", file=sys.stderr)
        return 2

    def matching(v: Vuln): return [a for a in accepted if a.package == canonicalize_name(v.package) and a.id in v.ids()]
    failed, ok, used = [], [], set()
    for v in found:
        entries = matching(v); used.update(entries)
        current = [a for a in entries if a.until >= today]
        if current: ok.append((v, current[0]))
        else: failed.append((v, entries))
    for v, a in ok:
        print(f"accepted: {v} (until {a.until}: {a.reason})")
    for a in accepted:
        if a not in used:
            print(f"audit: warning: stale acceptance in {rel(args.accept)}: {a.id} ({a.package}) matches no vulnerability "
                  f"in {', '.join(rel(lock) for lock in locks)}: delete it")
    for v, expired in failed:
        why = "".join(f"; its acceptance in {rel(args.accept)} expired on {a.until}" for a in expired)
        print(f"VULNERABLE: {v}{why}")
    summary = f"{len(locks)} lock{'s' * (len(locks) > 1)}, {len(found)} known vulnerabilities, {len(ok)} accepted"
    if failed:
        print(f"audit: FAILED: {summary}, {len(failed)} not: upgrade the package (then `make lock`), or accept the "
              f"vulnerability in {rel(args.accept)} with a reason and an until date")
        return 1
    print(f"audit: ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
