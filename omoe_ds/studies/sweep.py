"""Run omoe_ds.train over a grid, one real `deepspeed` launch per cell, into a results directory.

The skip-step sweep (paper Fig. 4) and the expert-count sweep (Fig. 5) of the README, on 2 CPU ranks:

    python -m omoe_ds.sweep --results-dir results/trec_sweep --skip-step 2,5,10,20 --experts 4 \
        --optimizer omoe,plain --seeds 42 -- \
        --task trec --model minilm-l6 --max-steps 100 --max-length 24 --lr 1e-4 \
        --deepspeed_config ds_configs/finetune_zero2.json
    python -m omoe_ds.sweep --results-dir results/trec_sweep --experts 2,4,8 --optimizer omoe,plain --seeds 42 -- \
        --task trec --model minilm-l6 --max-steps 100 --max-length 24 --lr 1e-4 \
        --deepspeed_config ds_configs/finetune_zero2.json
    python -m omoe_ds.report results/trec_sweep

Base optimizers with and without OMoE (paper Table VIII):

    python -m omoe_ds.sweep --results-dir results/optimizers --base-optimizer adamw,rmsprop,adagrad \
        --optimizer omoe,plain --seeds 1,2,3 -- --task trec --max-steps 100 --max-length 24 --lr 1e-4

Grid axes (comma-separated lists; every combination is a cell):
  --skip-step, --alpha0, --lam   OMoE's s, α0, λ (defaults: the ds config's "omoe" section)
  --experts                       experts per MoE layer (M)
  --ep-size                       "auto" (default): gcd(M, --world-size) for each M; or one integer for all cells
  --optimizer                     omoe (OMoE over each --base-optimizer), plain (each --base-optimizer alone),
                                  or a base optimizer by name (adamw, rmsprop, adagrad, sgd)
  --base-optimizer                the base optimizers (default adamw)
  --seeds                         training seeds
Everything after `--` goes to omoe_ds.train unchanged (task, model, budget, lr, --deepspeed_config, ...); the
flags the grid sets (--seed, --experts, --output-dir, ...) are refused there. Cells that are the same run are
launched once: a plain cell ignores s, α0 and λ, so `--skip-step 2,5,10 --optimizer omoe,plain` is 3 OMoE
cells and 1 baseline.

Instead of axis flags, `--grid FILE` (JSON, or YAML when PyYAML is installed) gives one grid as an object
with the same keys (`skip_step`, `experts`, `ep_size`, `optimizer`, `base_optimizer`, `seeds`, `alpha0`,
`lam`), or a list of such objects (their union); an object's optional `train_args` list is appended to the
command line's train flags for its cells (e.g. a different --lr for rmsprop), e.g.

    [{"optimizer": ["omoe", "plain"], "base_optimizer": ["adamw"], "seeds": [1, 2]},
     {"optimizer": ["omoe", "plain"], "base_optimizer": ["adagrad"], "seeds": [1, 2], "train_args": ["--lr", "1e-3"]}]

Results directory:
  cells/<cell>/      the run's --output-dir (results.json, metrics.jsonl, monitor/), plus cell.json (the
                     cell's axes, seed, train flags and exact command) and train.log (the launch's stdout+stderr)
  sweep.jsonl        one line per cell and invocation: finished / skipped (already finished) / failed with
                     its exit code and last log lines
  status.json        the latest state of every cell run into this dir (finished / failed, exit code, seconds)
A re-run continues the sweep: a cell whose results.json exists and is valid is skipped; a cell without one
(failed, interrupted) is launched again with --overwrite. A finished cell run with other train flags than
the current ones is refused up front (choose another --results-dir). Bad grid values are refused before
any launch with one error naming the value and the fix. A failed cell is recorded and the sweep goes on;
the exit status is 1 when any cell failed.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import itertools
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

BASE_OPTIMIZER_NAMES = ("adamw", "rmsprop", "adagrad", "sgd")
OPTIMIZER_CHOICES = ("omoe", "plain", *BASE_OPTIMIZER_NAMES)
AXES = ("skip_step", "experts", "ep_size", "optimizer", "base_optimizer", "seeds", "alpha0", "lam")
# train flags the grid owns, with the parse_args attribute they set
RESERVED = {"--seed": "seed", "--experts": "experts", "--ep-size": "ep_size", "--optimizer": "optimizer",
            "--base-optimizer": "base_optimizer", "--skip-step": "skip_step", "--alpha0": "alpha0", "--lam": "lam",
            "--output-dir": "output_dir", "--overwrite": "overwrite", "--local_rank": "local_rank"}
LOG_TAIL_LINES = 30


class SweepError(ValueError):
    """A bad grid or results directory, refused before any launch."""


@dataclass(frozen=True)
class Cell:
    optimizer: str            # omoe or a base optimizer name
    base_optimizer: str       # what OMoE wraps; equals optimizer for a plain cell
    experts: int
    ep_size: int
    seed: int
    skip_step: Optional[int] = None   # None for plain cells: they do not depend on it
    alpha0: Optional[float] = None
    lam: Optional[float] = None
    train_args: tuple = ()            # the flags after `--` (plus a sub-grid's own)
    tag: str = ""                     # set when train_args differ from the command line's

    @property
    def name(self) -> str:
        if self.optimizer == "omoe":
            head = f"omoe-{self.base_optimizer}_M{self.experts}_ep{self.ep_size}_s{self.skip_step}" \
                   f"_a{_num(self.alpha0)}_lam{_num(self.lam)}"
        else:
            head = f"{self.optimizer}_M{self.experts}_ep{self.ep_size}"
        return f"{head}_seed{self.seed}" + (f"_x{self.tag}" if self.tag else "")

    def grid_flags(self) -> List[str]:
        flags = ["--experts", str(self.experts), "--ep-size", str(self.ep_size), "--optimizer", self.optimizer,
                 "--seed", str(self.seed)]
        if self.optimizer == "omoe":
            flags += ["--base-optimizer", self.base_optimizer, "--skip-step", str(self.skip_step),
                      "--alpha0", _num(self.alpha0), "--lam", _num(self.lam)]
        return flags

    def axes(self) -> dict:
        d = asdict(self)
        d.pop("train_args")
        d.pop("tag")
        return d


def _num(x: float) -> str:
    """Short and exact: 1, 0.5, 1e-10."""
    short = f"{float(x):g}"
    return short if float(short) == float(x) else repr(float(x))


@dataclass
class Grid:
    skip_step: Sequence = (None,)
    experts: Sequence = (4,)
    ep_size: object = "auto"
    optimizer: Sequence = ("omoe", "plain")
    base_optimizer: Sequence = ("adamw",)
    seeds: Sequence = (42,)
    alpha0: Sequence = (None,)
    lam: Sequence = (None,)
    train_args: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- parsing

def _split(text: str, name: str, kind):
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            raise SweepError(f"{name}={text!r} has an empty entry: give a comma-separated list such as 2,5,10")
        try:
            values.append(kind(item))
        except ValueError:
            raise SweepError(f"{name}: {item!r} is not a{'n integer' if kind is int else ' number'}; "
                             f"give a comma-separated list of {'integers' if kind is int else 'numbers'}") from None
    return values


def _as_list(value, name: str, kind):
    if isinstance(value, str):
        return _split(value, name, kind)
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise SweepError(f"{name}: {v!r} is not an integer")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SweepError(f"{name}: {v!r} is not a number")
        out.append(kind(v))
    if not out:
        raise SweepError(f"{name} is an empty list: give at least one value")
    return out


def grid_from_mapping(d: dict, source: str) -> Grid:
    unknown = sorted(set(d) - set(AXES) - {"train_args", "seed"})
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {unknown}; valid keys are {sorted((*AXES, 'train_args'))}")
    g = Grid()
    kinds = {"skip_step": int, "experts": int, "seeds": int, "alpha0": float, "lam": float,
             "optimizer": str, "base_optimizer": str}
    for key, kind in kinds.items():
        src = "seed" if key == "seeds" and "seed" in d else key
        if src in d:
            label = "--" + src.replace("_", "-") if source == "flags" else f"{source}: {src}"
            setattr(g, key, _as_list(d[src], label, kind))
    if "ep_size" in d:
        g.ep_size = d["ep_size"]
    if "train_args" in d:
        if not isinstance(d["train_args"], list) or not all(isinstance(a, str) for a in d["train_args"]):
            raise SweepError(f"{source}: train_args must be a list of strings, e.g. [\"--lr\", \"1e-3\"]")
        g.train_args = list(d["train_args"])
    return g


def load_grid_file(path: str) -> List[Grid]:
    if not os.path.isfile(path):
        raise SweepError(f"--grid {path!r} does not exist")
    text = open(path).read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SweepError(f"--grid {path!r} is YAML but PyYAML is not installed: pip install pyyaml, "
                             "or write the grid as JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SweepError(f"--grid {path!r} is not valid JSON: {e}") from None
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(i, dict) for i in items):
        raise SweepError(f"--grid {path!r} must hold an object of axes or a non-empty list of such objects")
    return [grid_from_mapping(item, f"--grid {path} [{i}]") for i, item in enumerate(items)]


def _reserved_in(train_args: Sequence[str]) -> List[str]:
    return [a.split("=")[0] for a in train_args if a.split("=")[0] in RESERVED]


def parse_train_args(train_args: Sequence[str]):
    """omoe_ds.train's own parser over the pass-through flags (with a placeholder output dir), so a typo is
    refused here, not in the first cell; returns its namespace."""
    from ..finetune import train
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            ns = train.parse_args(list(train_args))
            defaults = train.parse_args([])
    except SystemExit:
        message = captured.getvalue().strip().splitlines()
        raise SweepError(f"train flags {' '.join(train_args)!r} are not understood by omoe_ds.train: "
                         f"{message[-1] if message else 'argparse error'}; see python -m omoe_ds.train --help") from None
    moved = _reserved_in(train_args) + [f"--{k}" for k in ("seed", "experts", "ep_size", "optimizer",
                                                             "base_optimizer", "skip_step", "alpha0", "lam")
                                        if getattr(ns, k) != getattr(defaults, k)]
    if moved:
        raise SweepError(f"train flag(s) {sorted(set(m.replace('_', '-') for m in moved))} after `--` are set by the "
                         "sweep itself: give them as grid axes (--seeds, --experts, --ep-size, --optimizer, "
                         "--base-optimizer, --skip-step, --alpha0, --lam); the output dir is --results-dir")
    return ns


def _omoe_defaults(ds_config_path: str) -> dict:
    from ..core.config import OMoEConfig, OMoEConfigError, resolve_ds_config
    try:
        config = resolve_ds_config(config=ds_config_path)
    except OMoEConfigError as e:
        raise SweepError(f"{e}; pass an existing JSON file as --deepspeed_config after `--`") from None
    section = config.get("omoe", {}) if isinstance(config.get("omoe", {}), dict) else {}
    base = OMoEConfig()
    return {k: section.get(k, getattr(base, k)) for k in ("skip_step", "alpha0", "lam")}


def expand(grids: List[Grid], common_args: Sequence[str], world_size: int) -> List[Cell]:
    """Every cell of the grids, checked, identical cells once, in a stable order."""
    from ..core.config import OMoEConfig, OMoEConfigError
    if world_size < 1:
        raise SweepError(f"--world-size={world_size} must be >= 1")
    cells, seen = [], set()
    for grid in grids:
        train_args = tuple(common_args) + tuple(grid.train_args)
        ns = parse_train_args(train_args)
        defaults = _omoe_defaults(ns.deepspeed_config)
        for name in grid.optimizer:
            if name not in OPTIMIZER_CHOICES:
                raise SweepError(f"--optimizer: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_CHOICES)} "
                                 "(omoe = OMoE over each --base-optimizer, plain = each base optimizer alone)")
        for name in grid.base_optimizer:
            if name not in BASE_OPTIMIZER_NAMES:
                raise SweepError(f"--base-optimizer: unknown optimizer {name!r}; choose from "
                                 f"{', '.join(BASE_OPTIMIZER_NAMES)}")
        for m in grid.experts:
            if m < 2:
                raise SweepError(f"--experts: {m} experts per layer is not an MoE (OMoE's leave-one-out needs M >= 2); "
                                 "use values >= 2 such as 2,4,8")
        for seed in grid.seeds:
            if not 0 <= seed < 2 ** 32:
                raise SweepError(f"--seeds: {seed} is out of range; seeds must lie in [0, 2**32) (numpy's limit)")
        ep_sizes = {}
        for m in grid.experts:
            if grid.ep_size in ("auto", None):
                ep_sizes[m] = math.gcd(m, world_size)
                continue
            try:
                ep = int(grid.ep_size)
            except (TypeError, ValueError):
                raise SweepError(f"--ep-size={grid.ep_size!r} is not 'auto' or an integer") from None
            if ep < 1 or m % ep:
                raise SweepError(f"--ep-size={ep} does not divide --experts value {m}; use experts that are multiples "
                                 f"of {ep}, or --ep-size auto (gcd(experts, world size))")
            if world_size % ep:
                raise SweepError(f"--ep-size={ep} does not divide --world-size={world_size}: DeepSpeed places each "
                                 "expert-parallel group inside the world; use a divisor of the world size or auto")
            ep_sizes[m] = ep
        skip = [defaults["skip_step"] if s is None else s for s in grid.skip_step]
        alpha0 = [defaults["alpha0"] if a is None else a for a in grid.alpha0]
        lam = [defaults["lam"] if x is None else x for x in grid.lam]
        if "omoe" in grid.optimizer:
            for s, a, x in itertools.product(skip, alpha0, lam):
                try:
                    OMoEConfig(skip_step=s, alpha0=a, lam=x)
                except OMoEConfigError as e:
                    flag = "--skip-step" if "skip_step" in str(e) else "--alpha0" if "alpha0" in str(e) else "--lam"
                    raise SweepError(f"{flag}: {e}") from None
        tag = "" if not grid.train_args else hashlib.sha1("\0".join(grid.train_args).encode()).hexdigest()[:6]
        for name, base, m, seed in itertools.product(grid.optimizer, grid.base_optimizer, grid.experts, grid.seeds):
            if name == "omoe":
                variants = [Cell("omoe", base, m, ep_sizes[m], seed, s, float(a), float(x), train_args, tag)
                            for s, a, x in itertools.product(skip, alpha0, lam)]
            else:
                plain = base if name == "plain" else name
                variants = [Cell(plain, plain, m, ep_sizes[m], seed, train_args=train_args, tag=tag)]
            for cell in variants:
                if cell not in seen:
                    seen.add(cell)
                    cells.append(cell)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):  # only if two sub-grids differ in train_args with the same hash prefix
        raise SweepError("two different cells got the same name; give the sub-grids different train_args")
    return cells


# ------------------------------------------------------------------------------------------- running

def deepspeed_command() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return here if os.path.exists(here) else (shutil.which("deepspeed") or "deepspeed")


def launch_env() -> dict:
    """As launch/env.sh: DeepSpeed's CPU accelerator where there is no GPU, one OpenMP thread per CPU rank."""
    env = dict(os.environ)
    if not env.get("DS_ACCELERATOR"):
        import torch
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    if env.get("DS_ACCELERATOR") == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def valid_results(cell_dir: str, cell: Optional[Cell] = None) -> Optional[dict]:
    """The cell's results.json when it exists, parses, holds the dev metric, and matches the cell."""
    path = os.path.join(cell_dir, "results.json")
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or r.get("primary_metric") not in r.get("dev", {}):
        return None
    if cell is not None and (r.get("seed") != cell.seed or r.get("optimizer") != cell.optimizer):
        return None
    return r


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-lines:]]
    except OSError:
        return []


def remove_shm_buffers(port: str) -> None:
    """DeepSpeed's CPU shm all-reduce (ops/csrc/cpu/comm/shm.cpp, 0.19.8) creates one 69 MB
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> per rank and never unlinks it; with a fresh
    port per cell every launch would leave ~69 MB x ranks of RAM behind. The cell's ranks are gone: remove them."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            os.remove(path)


def error_line(tail: List[str]) -> str:
    """The line of a log tail that says what went wrong: the last exception line, else the last line."""
    for line in reversed(tail):
        if re.search(r"(Error|Exception|error:)", line) and "exits with return code" not in line:
            return line.strip()
    return tail[-1].strip() if tail else "-"


class Sweep:
    def __init__(self, results_dir: str, cells: List[Cell], world_size: int, cell_timeout: Optional[float] = None,
                 echo=print):
        self.results_dir = os.path.abspath(results_dir)
        self.cells = cells
        self.world_size = world_size
        self.cell_timeout = cell_timeout
        self.echo = echo

    def cell_dir(self, cell: Cell) -> str:
        return os.path.join(self.results_dir, "cells", cell.name)

    def check_finished_cells(self) -> None:
        """A finished cell is reused only if it ran with the same train flags; otherwise refuse up front."""
        for cell in self.cells:
            d = self.cell_dir(cell)
            if valid_results(d, cell) is None:
                continue
            try:
                recorded = json.load(open(os.path.join(d, "cell.json")))["train_args"]
            except (OSError, ValueError, KeyError):
                continue  # finished but unrecorded (copied in by hand): trust it
            if list(recorded) != list(cell.train_args):
                raise SweepError(f"{d} holds a finished run with other train flags ({' '.join(recorded)!r}) than "
                                 f"this sweep's ({' '.join(cell.train_args)!r}); use another --results-dir, or the "
                                 "same flags to continue that sweep")

    def command(self, cell: Cell, overwrite: bool) -> List[str]:
        from ..core.environment import free_local_port
        return [deepspeed_command(), "--num_gpus", str(self.world_size), "--master_port", str(free_local_port()),
                "--module", "omoe_ds.train", *cell.grid_flags(), *cell.train_args,
                "--output-dir", self.cell_dir(cell), *(["--overwrite"] if overwrite else [])]

    def record(self, entry: dict) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}
        with open(os.path.join(self.results_dir, "sweep.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def write_status(self, status: dict) -> None:
        path = os.path.join(self.results_dir, "status.json")
        with open(path + ".tmp", "w") as f:
            json.dump(status, f, indent=1)
        os.replace(path + ".tmp", path)

    def run_cell(self, cell: Cell) -> dict:
        d = self.cell_dir(cell)
        overwrite = os.path.isdir(d) and bool(os.listdir(d))
        if overwrite:  # a half-finished run: its monitor files would otherwise mix with the new ones
            shutil.rmtree(os.path.join(d, "monitor"), ignore_errors=True)
        os.makedirs(d, exist_ok=True)
        cmd = self.command(cell, overwrite)
        with open(os.path.join(d, "cell.json"), "w") as f:
            json.dump({"cell": cell.name, **cell.axes(), "train_args": list(cell.train_args),
                       "world_size": self.world_size, "command": cmd, "cwd": os.getcwd()}, f, indent=1)
        log = os.path.join(d, "train.log")
        start = time.time()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=launch_env(),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=self.cell_timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc, timed_out = proc.returncode, True
            except BaseException:  # Ctrl-C: take the ranks down with the launcher
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                raise
        seconds = time.time() - start
        remove_shm_buffers(cmd[cmd.index("--master_port") + 1])
        results = valid_results(d, cell)
        entry = {"cell": cell.name, "seconds": round(seconds, 1), "returncode": rc}
        if rc == 0 and results is not None:
            return {**entry, "status": "finished"}
        reason = (f"timed out after {self.cell_timeout:g} s" if timed_out
                  else f"exit code {rc}" if rc != 0 else "exit code 0 but no valid results.json")
        tail = log_tail(log)
        return {**entry, "status": "failed", "error": reason, "error_line": error_line(tail), "log_tail": tail}

    def run(self) -> dict:
        os.makedirs(os.path.join(self.results_dir, "cells"), exist_ok=True)
        try:  # cells of earlier invocations (another grid into the same dir) keep their entries
            with open(os.path.join(self.results_dir, "status.json")) as f:
                status = json.load(f)
        except (OSError, ValueError):
            status = {}
        todo = [c for c in self.cells if valid_results(self.cell_dir(c), c) is None]
        self.echo(f"[omoe_ds.sweep] {len(self.cells)} cells, {len(self.cells) - len(todo)} already finished, "
                  f"{len(todo)} to run -> {self.results_dir}")
        for i, cell in enumerate(self.cells):
            if cell not in todo:
                entry = {"cell": cell.name, "status": "skipped", "reason": "results.json exists and is valid"}
            else:
                self.echo(f"[omoe_ds.sweep] ({todo.index(cell) + 1}/{len(todo)}) {cell.name} ...")
                entry = self.run_cell(cell)
                tail = "" if entry["status"] == "finished" else \
                    f": {entry['error']}: {error_line(entry['log_tail'])} (log: {self.cell_dir(cell)}/train.log)"
                self.echo(f"[omoe_ds.sweep]   {entry['status']} in {entry['seconds']:.0f} s{tail}")
            self.record(entry)
            status[cell.name] = {k: v for k, v in entry.items() if k != "log_tail"} if entry["status"] != "skipped" \
                else {**status.get(cell.name, {}), "status": "finished", "reused": True}
            self.write_status(status)
        return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m omoe_ds.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", required=True)
    p.add_argument("--grid", default=None, help="JSON/YAML grid file instead of the axis flags")
    p.add_argument("--skip-step", default=None)
    p.add_argument("--experts", default=None)
    p.add_argument("--ep-size", default=None, help="'auto' (gcd(experts, world size)) or an integer")
    p.add_argument("--optimizer", default=None, help="comma list of omoe, plain, adamw, rmsprop, adagrad, sgd")
    p.add_argument("--base-optimizer", default=None)
    p.add_argument("--seeds", default=None)
    p.add_argument("--alpha0", default=None)
    p.add_argument("--lam", default=None)
    p.add_argument("--world-size", type=int, default=2, help="ranks per cell (deepspeed --num_gpus)")
    p.add_argument("--cell-timeout", type=float, default=None, help="seconds; a cell running longer is killed, failed")
    p.add_argument("--dry-run", action="store_true", help="print the cells and commands, launch nothing")
    args = p.parse_args(argv)
    axis_flags = {k: getattr(args, k) for k in AXES if getattr(args, k) is not None}
    try:
        if args.grid:
            if axis_flags:
                raise SweepError(f"--grid {args.grid} and axis flags {sorted('--' + k.replace('_', '-') for k in axis_flags)} "
                                 "were both given: put every axis into the grid file, or use flags only")
            grids = load_grid_file(args.grid)
        else:
            grids = [grid_from_mapping(axis_flags, "flags")]
        cells = expand(grids, train_args, args.world_size)
        sweep = Sweep(args.results_dir, cells, args.world_size, args.cell_timeout)
        sweep.check_finished_cells()
    except SweepError as e:
        print(f"omoe_ds.sweep: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in cells:
            done = valid_results(sweep.cell_dir(cell), cell) is not None
            print(f"{'done ' if done else 'todo '}{cell.name}: {' '.join(sweep.command(cell, False)[1:])}")
        return 0
    status = sweep.run()
    status = {c.name: status[c.name] for c in cells}
    failed = [name for name, s in status.items() if s["status"] == "failed"]
    print(f"[omoe_ds.sweep] done: {len(status) - len(failed)} finished, {len(failed)} failed"
          + (f" ({', '.join(failed)}); see {os.path.join(sweep.results_dir, 'sweep.jsonl')}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
