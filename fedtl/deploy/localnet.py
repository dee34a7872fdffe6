"""A secure Flower deployment on one machine: a SuperLink and SuperNodes as separate processes.

The deployment tests and ``benchmarks/deploy_round_time.py`` use it; it runs the same
commands the README's "Run on real machines" section documents (TLS on, SuperNode
authentication on, each process with its own ``FLWR_HOME``).

With ``isolate=True`` (needs root and iproute2) every machine gets its own network namespace:
the SuperLink's holds a bridge at 10.231.0.1/24, each SuperNode's a veth link into that
bridge with its own address (10.231.0.11, .12, ...), so every message crosses a real network
hop. Otherwise everything listens on 127.0.0.1 with free ports.

``close()`` stops every process it started by its process id, together with the processes
those started (Flower's SuperExec and ClientApp processes, found through /proc), also when a
test fails; the namespaces and their links are deleted with them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtl.deploy.certs import Certs, make_certs

SUBNET = "10.231.0"
LINK_ADDRESS = f"{SUBNET}.1"
SUPERLINK_PORT = 8000  # Flower 1.42's default
CONNECTION = "fedtl"  # the connection's name in the CLI's $FLWR_HOME/config.toml


def can_isolate() -> bool:
    """True when network namespaces can be made here (root and iproute2's ``ip``)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_pairs(values: Mapping[str, Any]) -> str:
    """``k=v`` pairs as Flower's ``--run-config`` / ``--node-config`` parse them."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())


def _json(text: str) -> dict:
    """The JSON object the flwr CLI prints with ``--format json`` (after any other output)."""
    return json.loads(text[text.index("{"):])


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _identify(pids: Sequence[int]) -> list[tuple[int, int]]:
    """(pid, start time) pairs: a pid is signalled later only if it is still that process."""
    return [(p, t) for p in pids if (t := _start_time(p)) is not None]


def _signal(procs: Sequence[tuple[int, int]], sig: int) -> None:
    for pid, started in procs:
        if _start_time(pid) != started:
            continue  # gone, or the pid now belongs to another process
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Proc:
    """One started process: its name, Popen handle and log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    namespace: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LocalDeployment:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes on demand.

    ``workdir``: certificates, FLWR_HOME folders and logs go here. ``node_keys``: names of the
    SuperNode key pairs to create. ``isolate``: network namespaces (None: when possible).
    """

    workdir: Path
    node_keys: Sequence[str] = ("supernode-1", "supernode-2")
    isolate: bool | None = None
    env: dict[str, str] = field(default_factory=dict)
    certs: Certs = field(init=False)
    procs: list[Proc] = field(default_factory=list, init=False)
    namespaces: list[str] = field(default_factory=list, init=False)
    superlink: Proc | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.isolate is None:
            self.isolate = can_isolate()
        self._tag = f"fedtl{os.getpid()}"
        self._bin = Path(sys.executable).parent
        self._node_count = 0
        self.host = LINK_ADDRESS if self.isolate else "127.0.0.1"
        self.port = SUPERLINK_PORT if self.isolate else _free_port()

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def link_namespace(self) -> str | None:
        return f"{self._tag}-link" if self.isolate else None

    def start(self) -> None:
        """Certificates, network, SuperLink (TLS, node authentication) and the CLI's config."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.certs = make_certs(self.workdir / "certs", [self.host], list(self.node_keys))
        if self.isolate:
            self._make_link_namespace()
        c = self.certs
        self.superlink = self._spawn(
            "superlink",
            ["flower-superlink", "--ssl-certfile", c.superlink_cert, "--ssl-keyfile",
             c.superlink_key, "--ssl-ca-certfile", c.ca_cert, "--enable-supernode-auth",
             "--disable-runtime-dependency-installation",
             "--host", "0.0.0.0" if self.isolate else self.host, "--port", str(self.port)],
            self.link_namespace)
        self._wait_for(self.superlink, "Uvicorn running on", 180)
        home = self._home("cli")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{c.ca_cert}"\n')

    def close(self) -> None:
        """Stop every started process (and its descendants) by id; delete the namespaces."""
        trees = [_identify(process_tree(p.pid)) for p in reversed(self.procs) if p.alive()]
        for procs in trees:
            _signal(procs, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for procs in trees:  # whatever ignored SIGTERM, and descendants left behind
            _signal(procs, signal.SIGKILL)
        for p in self.procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

    # --- processes ------------------------------------------------------------------------

    def _home(self, name: str) -> Path:
        home = self.workdir / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def _env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{self._bin}{os.pathsep}{env.get('PATH', '')}",
        })
        env.update(self.env)
        return env

    def _command(self, args: Sequence[Any], namespace: str | None) -> list[str]:
        cmd = [str(a) for a in args]
        cmd[0] = str(self._bin / cmd[0])
        return (["ip", "netns", "exec", namespace] if namespace else []) + cmd

    def _spawn(self, name: str, args: Sequence[Any], namespace: str | None,
               home: str | None = None) -> Proc:
        """Start a process in ``namespace`` with its own FLWR_HOME (``home``, default
        ``name``), output to logs/<name>.log, in its own session."""
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(self._command(args, namespace), stdout=fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._env(self._home(home or name)),
                                     cwd=self.workdir, start_new_session=True)
        proc = Proc(name, popen, log, namespace)
        self.procs.append(proc)
        return proc

    def cli(self, args: Sequence[Any], timeout: float = 120, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (from the SuperLink's namespace)."""
        return subprocess.run(self._command(["flwr", *args], self.link_namespace),
                              capture_output=True, text=True, timeout=timeout,
                              env=self._env(self._home("cli")), cwd=cwd or self.workdir)

    def _wait_for(self, proc: Proc, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in proc.output():
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n"
                                   f"{proc.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name}: no '{text}' within {timeout:.0f} s:\n"
                                   f"{proc.output()[-3000:]}")
            time.sleep(0.2)

    # --- network namespaces ---------------------------------------------------------------

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def _add_namespace(self, name: str) -> None:
        self._ip("netns", "add", name)
        self.namespaces.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def _make_link_namespace(self) -> None:
        ns = self.link_namespace
        assert ns is not None
        self._add_namespace(ns)
        self._ip("-n", ns, "link", "add", "br0", "type", "bridge")
        self._ip("-n", ns, "addr", "add", f"{LINK_ADDRESS}/24", "dev", "br0")
        self._ip("-n", ns, "link", "set", "br0", "up")

    def _node_namespace(self, name: str) -> tuple[str, str]:
        """A new namespace for a SuperNode, linked to the SuperLink's bridge; its address."""
        self._node_count += 1
        i = self._node_count
        ns, link = f"{self._tag}-{name}", self.link_namespace
        assert link is not None
        address = f"{SUBNET}.{10 + i}"
        self._add_namespace(ns)
        self._ip("-n", link, "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self._ip("-n", link, "link", "set", f"veth{i}", "master", "br0", "up")
        self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        return ns, address

    # --- the federation -------------------------------------------------------------------

    def register(self, *keys: str, timeout: float = 120) -> list[int]:
        """Register the public keys of SuperNode keys ``keys`` (in parallel: each ``flwr``
        call starts a Python process); returns their node ids."""
        calls = [subprocess.Popen(
            self._command(["flwr", "supernode", "register", self.certs.supernode_keys[k][1],
                           CONNECTION, "--format", "json"], self.link_namespace),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self._env(self._home("cli")), cwd=self.workdir) for k in keys]
        ids = []
        for key, call in zip(keys, calls):
            out, err = call.communicate(timeout=timeout)
            if call.returncode != 0:
                raise RuntimeError(f"flwr supernode register {key}.pub failed:\n{out}{err}")
            ids.append(int(_json(out)["node-id"]))
        return ids

    def start_supernode(self, name: str, node_config: Mapping[str, Any], *,
                        key: str | None = None, root_certificates: bool = True,
                        extra: Sequence[str] = ()) -> Proc:
        """Start SuperNode ``name`` (its own namespace when isolating) with key ``key``
        (default: ``name``) and ``node_config``; ``root_certificates=False`` leaves out the
        CA certificate (the node then trusts only the system's CAs)."""
        key = key or name
        namespace = None
        if self.isolate:
            namespace, _ = self._node_namespace(name)
        args: list[Any] = ["flower-supernode", "--superlink", self.address,
                           "--auth-supernode-private-key", self.certs.supernode_keys[key][0],
                           "--node-config", toml_pairs(node_config),
                           "--port", str(9094 if self.isolate else _free_port()),
                           "--max-retries", "3", *extra]
        if root_certificates:
            args += ["--root-certificates", self.certs.ca_cert]
        return self._spawn(name, args, namespace)

    def wait_connected(self, procs: Sequence[Proc], timeout: float = 180) -> None:
        """Wait until each SuperNode in ``procs`` has been let in (it logs its node id)."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            self._wait_for(proc, "SuperNode ID:", max(1.0, deadline - time.monotonic()))

    def start_run(self, app: Path, run_config: Mapping[str, Any], name: str = "run") -> Proc:
        """``flwr run APP <connection> --stream --run-config ...`` in the background."""
        return self._spawn(name, ["flwr", "run", app, CONNECTION, "--stream", "--run-config",
                                  toml_pairs(run_config)], self.link_namespace, home="cli")

    def stop(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to ``proc`` and every process it started (a crashed machine)."""
        _signal(_identify(process_tree(proc.pid)), sig)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
