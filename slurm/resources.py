"""CPUs and memory per task that fit the partition's nodes, read from SLURM (``sinfo``) before submitting.

    from slurm.resources import fit, read_nodes
    [(name, nodes)] = read_nodes("gpu")   # sinfo -N -h -o '%P|%N|%c|%m|%G|%T|%f' -p gpu
    res = fit(name, nodes, tasks_per_node=8, nodes_needed=1, cpus_per_gpu=None, mem_per_gpu=None)
    res.cpus_per_gpu, res.mem_per_gpu     # 8, '56G' on nodes of 64 CPUs, RealMemory=515000 (MB), gpu:8
    res.cpus_source                       # 'sinfo: partition gpu, 64 CPUs / 8 GPUs per node'

A number nobody chose (not the user's flag or key, not the recipe's) is derived from the nodes: CPUs per task =
node CPUs // the node's GPUs (its fair share: a job on half the GPUs leaves the other half their CPUs), memory
per GPU = node memory × (1 - MEM_MARGIN) // the node's GPUs (RealMemory is all SLURM hands out; the margin keeps
page cache and the daemons' share off the edge). In a mixed partition only the nodes that can run the job count
(enough GPUs, the ``--constraint`` features), and the job is sized for the smallest share among them, so it fits
any of them. A number that was chosen is checked instead: a request no node can hold (more GPUs per node than
the nodes have, CPUs per task × tasks per node over the node's CPUs, memory over the node's, a partition that
does not exist) is a :class:`ResourceError` naming the flag and the value that fits. When sinfo cannot answer,
nothing is refused here: the launcher keeps the configured numbers and says why (:class:`SinfoUnavailable`).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass, replace

SINFO_FORMAT = "%P|%N|%c|%m|%G|%T|%f"  # partition|node|CPUs|memory (MB)|GRES|state|features; '|' is in none
MEM_MARGIN = 0.10  # of a node's memory left out of a derived request
SINFO_TIMEOUT_S = 30
# node states (sinfo %T, suffixes stripped) in which a node runs no new job until someone acts
UNUSABLE_STATES = (
    "down",
    "drain",
    "drained",
    "draining",
    "fail",
    "failing",
    "future",
    "maint",
    "reboot",
    "inval",
)

__all__ = [
    "MEM_MARGIN",
    "Node",
    "ResourceError",
    "Resources",
    "SinfoUnavailable",
    "fit",
    "format_mb",
    "parse_gres_gpus",
    "parse_sinfo",
    "plan_resources",
    "read_nodes",
    "size_mb",
]


class ResourceError(ValueError):
    """A request no node of the partition can hold, in one line naming the flag that fixes it."""


class SinfoUnavailable(RuntimeError):
    """sinfo could not be asked (not installed, no controller, an error): the configured numbers stand."""


@dataclass(frozen=True)
class Node:
    """One node of a partition as sinfo reports it."""

    name: str
    partition: str  # without the default partition's '*'
    cpus: int
    mem_mb: int  # RealMemory
    gpus: int  # GRES gpu count, all types summed
    state: str  # sinfo %T without its flag suffixes (idle, mixed, allocated, drained, down, ...)
    features: tuple[str, ...] = ()
    default: bool = False  # in the cluster's default partition

    @property
    def usable(self) -> bool:
        return not any(self.state.startswith(s) for s in UNUSABLE_STATES)


@dataclass(frozen=True)
class Resources:
    """What a job asks per task, and where each number came from (one line each, for the dry run)."""

    cpus_per_gpu: int
    mem_per_gpu: str  # SLURM units: 57G, 500M
    cpus_source: str
    mem_source: str
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # a refusal that --force turned into a warning


# ------------------------------------------------------------------------------------------------ parsing


def _smallest(text: str) -> int:
    """sinfo's ``%c`` (CPUs) or ``%m`` (MB): ``64``; an aggregate over nodes of different sizes reads ``64+``
    (the smallest)."""
    return int(text.strip().rstrip("+"))


_COUNT = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)
_SCALE = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}  # SLURM's count suffixes (gres.conf)


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses: ``gpu:a100:4(S:0,1),shard:8`` → 2 items."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur]


def parse_gres_gpus(text: str) -> int:
    """GPUs in sinfo's ``%G``: ``gpu:8``, ``gpu:a100:8(S:0-1)``, ``gpu:h100:4,shard:h100:16``,
    ``gpu:a100:2(S:0),gpu:v100:2(S:1)`` (types summed), ``gpu`` (one), ``(null)`` / empty (none). Shards, MPS and
    other GRES are not GPUs a task can own."""
    total = 0
    for item in _split_top(text.strip()):
        item = re.sub(r"\(.*\)$", "", item.strip())  # (S:0-1), (IDX:0-3)
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) == 1:
            total += 1
            continue
        m = _COUNT.fullmatch(parts[-1])
        total += int(m[1]) * _SCALE[m[2].upper()] if m else 1  # gpu:a100 (a type, no count): one
    return total


def parse_sinfo(text: str) -> list[Node]:
    """Lines of ``sinfo -N -h -o SINFO_FORMAT`` → nodes (one per node and partition)."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 6:
            raise SinfoUnavailable(f"sinfo printed an unexpected line: {line.strip()!r}")
        partition, name, cpus, mem, gres, state = (f.strip() for f in fields[:6])
        features = fields[6].strip() if len(fields) > 6 else ""
        try:
            nodes.append(
                Node(
                    name=name,
                    partition=partition.rstrip("*"),
                    cpus=_smallest(cpus),
                    mem_mb=_smallest(mem),
                    gpus=parse_gres_gpus(gres),
                    state=state.lower().rstrip("*~#!%$@^-+"),
                    features=tuple(f for f in features.split(",") if f and f != "(null)"),
                    default=partition.endswith("*"),
                )
            )
        except ValueError:
            raise SinfoUnavailable(f"sinfo printed an unexpected line: {line.strip()!r}") from None
    return nodes


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", re.IGNORECASE)
_MB_PER_UNIT = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}  # SLURM: no unit means MB


def size_mb_exact(text: str) -> float | None:
    """``64G``, ``500M``, ``1.5T``, ``4096`` (MB) → MB; None when it is not a size."""
    m = _SIZE.fullmatch(text)
    return float(m[1]) * _MB_PER_UNIT[m[2].upper()] if m else None


def size_mb(text: str) -> int | None:
    """``size_mb_exact`` rounded up to whole MB."""
    mb = size_mb_exact(text)
    return math.ceil(mb) if mb is not None else None


def format_mb(mb: int) -> str:
    """MB → SLURM's units, whole GB when it is one (``57G``), else MB (``1500M``)."""
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def _span(values: list[int]) -> str:
    """``64`` when all are 64, else ``40-128``."""
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _round_down_mb(mb: int) -> int:
    """Whole GB from 1 GB up (a request reads better and still fits), MB below."""
    return mb // 1024 * 1024 if mb >= 1024 else mb


# ------------------------------------------------------------------------------------------------ sinfo


def read_nodes(partition: str | None, timeout_s: float = SINFO_TIMEOUT_S) -> list[tuple[str, list[Node]]]:
    """``[(partition, nodes), ...]`` for ``partition`` (``gpu``; ``a,b``: sbatch's list, in its order; None: the
    cluster's default partition) from one sinfo call.

    ResourceError when a partition does not exist or has no nodes; SinfoUnavailable when sinfo cannot answer."""
    cmd = ["sinfo", "-N", "-h", "-o", SINFO_FORMAT, *(["-p", partition] if partition else [])]
    nodes = parse_sinfo(run_sinfo(cmd, timeout_s))
    if partition:
        names = [p.strip() for p in partition.split(",") if p.strip()]
    else:
        names = sorted({n.partition for n in nodes if n.default})[:1]
        if not names:
            raise SinfoUnavailable("sinfo names no default partition (give --partition)")
    found: dict[str, dict[str, Node]] = {name: {} for name in names}  # node name → node, once per partition
    for n in nodes:
        if n.partition in found:
            found[n.partition].setdefault(n.name, n)
    empty = [name for name in names if not found[name]]
    if empty:
        lines = run_sinfo(["sinfo", "-h", "-o", "%P"], timeout_s).split()
        known = list(dict.fromkeys(p.strip() for p in lines if p.strip()))
        for name in empty:
            if name not in {k.rstrip("*") for k in known}:
                choices = ", ".join(known) or "none"
                fix = known[0].rstrip("*") if len(known) == 1 else "NAME"
                raise ResourceError(
                    f"partition {name!r} does not exist (sinfo lists: {choices}; * is the default): use "
                    f"--partition {fix} (launch.partition={fix})"
                )
        raise ResourceError(
            f"partition {empty[0]!r} has no nodes (sinfo -p {empty[0]}): use another --partition"
        )
    return [(name, list(found[name].values())) for name in names]


def run_sinfo(cmd: list[str], timeout_s: float) -> str:
    """sinfo's output; ``SinfoUnavailable`` (one line) when it is missing, slow or fails."""
    if shutil.which(cmd[0]) is None:
        raise SinfoUnavailable("sinfo not found on PATH")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SinfoUnavailable(f"sinfo did not answer within {timeout_s:.0f} s") from None
    except OSError as e:
        raise SinfoUnavailable(f"sinfo could not run: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        message = re.sub(r"^sinfo: ", "", lines[-1]) if lines else "no message"
        if "invalid partition" in message.lower() and "-p" in cmd:
            return ""  # newer sinfo: an unknown -p is an error; read_nodes names the partitions
        raise SinfoUnavailable(f"sinfo exited {proc.returncode}: {message}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------ fit


def _constraint_filter(constraint: str | None) -> tuple[object, str | None]:
    """A predicate on a node's features for ``--constraint`` (``a100``, ``a100&ib``, ``a100|h100``), and a note
    when the expression is more than that (counts, brackets: then every node counts)."""
    if not constraint:
        return (lambda feats: True), None
    if re.fullmatch(r"[\w.-]+(&[\w.-]+)*", constraint):
        want = set(constraint.split("&"))
        return (lambda feats: want <= set(feats)), None
    if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", constraint):
        any_of = set(constraint.split("|"))
        return (lambda feats: bool(any_of & set(feats))), None
    return (
        lambda feats: True
    ), f"--constraint {constraint!r} is not applied to the sizing (every node counts)"


def fit(
    partition: str,
    nodes: list[Node],
    tasks_per_node: int,
    nodes_needed: int,
    cpus_per_gpu: int | None,
    mem_per_gpu: str | None,
    constraint: str | None = None,
    chosen_by: tuple[str, str] = ("you: --cpus-per-gpu", "you: --mem-per-gpu"),
) -> Resources:
    """CPUs and memory per task for ``tasks_per_node`` tasks (one per GPU) on ``nodes_needed`` of ``nodes``.

    ``cpus_per_gpu`` / ``mem_per_gpu``: a chosen value, checked against the nodes; None: derived from them.
    ``chosen_by``: who chose each value (``you: --cpus-per-gpu``, ``recipe: launch.cpus_per_gpu``), for the
    sources and the messages. ResourceError (one line, naming the flag that fixes it) when it cannot fit."""
    accepts, constraint_note = _constraint_filter(constraint)
    notes = [constraint_note] if constraint_note else []
    pool = [n for n in nodes if accepts(n.features)]
    where = f"partition {partition}" + (
        f" with --constraint {constraint}" if constraint and not constraint_note else ""
    )
    if not pool:
        raise ResourceError(
            f"no node of partition {partition} has the features --constraint {constraint}: use another --constraint "
            f"(sinfo -p {partition} -o '%N %f' lists the nodes' features)"
        )
    most_gpus = max(n.gpus for n in pool)
    if most_gpus == 0:
        raise ResourceError(
            f"{where} has no GPUs (no gpu GRES on its nodes): choose a GPU partition with --partition "
            f"(sinfo -o '%P %G' lists each partition's GRES)"
        )
    if tasks_per_node > most_gpus:
        raise ResourceError(
            f"{tasks_per_node} GPUs per node, but the nodes of {where} have at most {most_gpus}: use "
            f"--gpus-per-node {most_gpus} (launch.gpus_per_node={most_gpus})"
        )
    hosts = [n for n in pool if n.gpus >= tasks_per_node]  # the nodes that can run the job
    if len(hosts) < nodes_needed:
        raise ResourceError(
            f"the job needs {nodes_needed} nodes with {tasks_per_node}+ GPUs, but {where} has {len(hosts)}: use "
            f"--gpus {len(hosts) * tasks_per_node} or fewer"
        )
    # each node's fair share per GPU: a job on some of a node's GPUs leaves the others their CPUs and memory
    least_cpus = min(hosts, key=lambda n: (n.cpus // n.gpus, n.cpus))
    least_mem = min(hosts, key=lambda n: (n.mem_mb // n.gpus, n.mem_mb))
    if len({(n.cpus, n.mem_mb, n.gpus) for n in pool}) > 1:
        smallest = sorted(
            {least_cpus.name: least_cpus, least_mem.name: least_mem}.values(), key=lambda n: n.name
        )
        notes.append(
            f"mixed partition: {len(hosts)} of the {len(pool)} nodes of {where} can run {tasks_per_node} tasks "
            f"({tasks_per_node}+ GPUs); sized to fit each of them, the smallest share per GPU being "
            + " and ".join(f"{n.name} ({n.cpus} CPUs, {n.mem_mb} MB, {n.gpus} GPUs)" for n in smallest)
        )

    def too_few(values: list[int], need: int, unit: str) -> str:  # why `need` fits too few of the hosts
        if nodes_needed == 1:
            return f"the nodes of {where} have at most {max(values)}{unit}"
        return f"{sum(v >= need for v in values)} node(s) of {where} have that many (the job needs {nodes_needed})"

    if cpus_per_gpu is None:
        cpus = least_cpus.cpus // least_cpus.gpus
        if cpus < 1:  # fewer CPUs than GPUs: then one CPU per task, if there are enough
            cpus = 1
            if least_cpus.cpus < tasks_per_node:
                raise ResourceError(
                    f"node {least_cpus.name} of {where} has {least_cpus.cpus} CPUs for {tasks_per_node} tasks: use "
                    f"--gpus-per-node {least_cpus.cpus} (launch.gpus_per_node={least_cpus.cpus})"
                )
        cpus_source = f"sinfo: {where}, {least_cpus.cpus} CPUs / {least_cpus.gpus} GPUs per node"
    else:
        cpus, need = cpus_per_gpu, cpus_per_gpu * tasks_per_node
        if sum(n.cpus >= need for n in hosts) < nodes_needed:
            fits = sorted((n.cpus for n in hosts), reverse=True)[nodes_needed - 1] // tasks_per_node
            fix = (
                f"--cpus-per-gpu {fits} (launch.cpus_per_gpu={fits})"
                if fits >= 1
                else "fewer --gpus-per-node (launch.gpus_per_node)"
            )
            raise ResourceError(
                f"{cpus} CPUs per GPU ({chosen_by[0]}) × {tasks_per_node} tasks per node = {need} CPUs, but "
                f"{too_few([n.cpus for n in hosts], need, '')}: use {fix}"
            )
        cpus_source = f"{chosen_by[0]}; fits {where}: {_span([n.cpus for n in hosts])} CPUs per node"

    if mem_per_gpu is None:
        per_gpu_mb = _round_down_mb(int(least_mem.mem_mb * (1 - MEM_MARGIN)) // least_mem.gpus)
        if per_gpu_mb < 1:
            raise ResourceError(
                f"node {least_mem.name} of {where} reports {least_mem.mem_mb} MB (RealMemory unset?): give "
                f"--mem-per-gpu SIZE (launch.mem_per_gpu=SIZE) that the site allows"
            )
        mem = format_mb(per_gpu_mb)
        mem_source = (
            f"sinfo: {where}, {least_mem.mem_mb} MB per node less {MEM_MARGIN:.0%}, / {least_mem.gpus} GPUs"
        )
    else:
        mem, per_gpu_mb = mem_per_gpu, size_mb(mem_per_gpu)
        if per_gpu_mb is None:
            raise ResourceError(f"launch.mem_per_gpu={mem_per_gpu!r} is not a size like 64G or 500M")
        need_mb = per_gpu_mb * tasks_per_node
        if sum(n.mem_mb >= need_mb for n in hosts) < nodes_needed:
            most = sorted((n.mem_mb for n in hosts), reverse=True)[nodes_needed - 1]
            fits = format_mb(_round_down_mb(most // tasks_per_node))
            raise ResourceError(
                f"{mem} per GPU ({chosen_by[1]}) × {tasks_per_node} tasks per node = {format_mb(need_mb)}, but "
                f"{too_few([n.mem_mb for n in hosts], need_mb, ' MB (sinfo %m)')}: use --mem-per-gpu {fits} "
                f"(launch.mem_per_gpu={fits})"
            )
        mem_source = f"{chosen_by[1]}; fits {where}: {_span([n.mem_mb for n in hosts])} MB per node"

    both = [n for n in hosts if n.cpus >= cpus * tasks_per_node and n.mem_mb >= per_gpu_mb * tasks_per_node]
    # mixed partition: enough nodes with the CPUs, enough with the memory, too few with both
    if len(both) < nodes_needed:
        raise ResourceError(
            f"{cpus} CPUs and {mem} per GPU × {tasks_per_node} tasks per node fit {len(both)} node(s) of {where}, "
            f"the job needs {nodes_needed}: lower --cpus-per-gpu or --mem-per-gpu"
        )
    up = [n for n in both if n.usable]
    if len(up) < nodes_needed:
        down = ", ".join(f"{n.name} ({n.state})" for n in both if not n.usable)
        notes.append(
            f"only {len(up)} of the {len(both)} node(s) of {where} that fit the job are up (the others: {down}): "
            f"it waits until {nodes_needed} are"
        )
    return Resources(cpus, mem, cpus_source, mem_source, tuple(notes))


# ------------------------------------------------------------------------------------------------ plan


def plan_resources(
    cfg, tasks_per_node: int, nodes_needed: int, given: Collection[str] = (), force: bool = False
) -> Resources:
    """The job's CPUs and memory per task for a config (``train.config.Config``): a value the user gave
    (``given``: the keys they set) or the recipe set (other than ``LaunchConfig``'s default) is kept and checked;
    the rest is derived from the partition's nodes. ``--cluster local/debug`` and a sinfo that cannot answer keep
    the configured values. ResourceError (one line) when the request cannot fit; with ``force`` that is a warning
    and the configured values go to sbatch as they are (a site whose sbatch accepts what sinfo does not show)."""
    from train.config import LaunchConfig

    la, default = cfg.launch, LaunchConfig()

    def chosen(key: str, flag: str) -> str | None:
        name = key.split(".")[1]
        if key in given:
            return f"you: {flag}"
        if getattr(la, name) != getattr(default, name):
            return f"recipe: {key}"
        return None

    who = (chosen("launch.cpus_per_gpu", "--cpus-per-gpu"), chosen("launch.mem_per_gpu", "--mem-per-gpu"))
    if la.cluster != "slurm":
        why = f"--cluster {la.cluster} does not ask SLURM"
        return Resources(
            la.cpus_per_gpu, la.mem_per_gpu, who[0] or f"default; {why}", who[1] or f"default; {why}"
        )
    try:
        partitions = read_nodes(la.partition)
    except SinfoUnavailable as e:  # sbatch judges whether the configured numbers fit
        return Resources(
            la.cpus_per_gpu,
            la.mem_per_gpu,
            who[0] or f"default; sinfo unavailable: {e}",
            who[1] or f"default; sinfo unavailable: {e}",
        )
    errors: list[ResourceError] = []
    for (
        partition,
        nodes,
    ) in partitions:  # sbatch -p a,b: the job runs in one of them; sized for the first that fits
        try:
            res = fit(
                partition,
                nodes,
                tasks_per_node,
                nodes_needed,
                la.cpus_per_gpu if who[0] else None,
                la.mem_per_gpu if who[1] else None,
                la.constraint,
                (who[0] or "", who[1] or ""),
            )
        except ResourceError as e:
            errors.append(e)
            continue
        if len(partitions) > 1:
            why = f" ({', '.join(p for p, _ in partitions[: len(errors)])} cannot hold it)" if errors else ""
            return replace(res, notes=(*res.notes, f"--partition {la.partition}: sized for {partition}{why}"))
        return res
    if not force:
        raise errors[0]
    unchecked = "--force: not fitted to sinfo"
    return Resources(
        la.cpus_per_gpu,
        la.mem_per_gpu,
        f"{who[0] or 'default'}; {unchecked}",
        f"{who[1] or 'default'}; {unchecked}",
        warnings=(f"{errors[0]} (--force: submitted as asked; sbatch or the scheduler decides)",),
    )
