"""The one way every command gets a Ray cluster.

Attach to ``RAY_ADDRESS`` when it is set (``ray job submit`` sets it; so does a user pointing at
a cluster). Otherwise start a local Ray whose logical CPU count leaves headroom above the physical
cores: Ray Data's read and map tasks need CPU slots while the Train workers hold theirs, and on a
2-core machine a 1:1 mapping stalls streaming with no error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from sslmm_ray.errors import UserError

log = logging.getLogger(__name__)

#: Logical CPUs per physical core on a local cluster (see module docstring).
LOCAL_CPU_OVERSUBSCRIPTION = 2
#: Logical CPUs kept free for Ray Data tasks when planning Train workers.
DATA_HEADROOM_CPUS = 1.0


#: Set to 1 when local paths are on a filesystem that every node mounts (NFS, EFS, Lustre).
SHARED_FILESYSTEM_ENV = "SSLMM_SHARED_FILESYSTEM"


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    cpus: float
    gpus: float
    local: bool
    nodes: int = 1


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars and plans flood the logs of every epoch."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init(num_cpus: int | None = None, *, quiet: bool = True) -> ClusterInfo:
    """Connect to (or start) Ray once per process and describe what is there."""
    address = os.environ.get("RAY_ADDRESS")
    local = not address
    if not ray.is_initialized():
        # Worker logs stay in the session's log folder (and the dashboard) unless asked for:
        # progress comes from the run's history instead (see train.progress).
        verbose = os.environ.get("SSLMM_VERBOSE") == "1"
        kwargs: dict = {"log_to_driver": verbose, "configure_logging": True}
        if quiet:
            kwargs["logging_level"] = logging.WARNING
        if local:
            cores = os.cpu_count() or 1
            kwargs["num_cpus"] = num_cpus or max(4, cores * LOCAL_CPU_OVERSUBSCRIPTION)
            # The dashboard hosts the State API, which Train V2's placement-group cleaner polls:
            # without it a trial that ASHA stops leaves its workers' placement group (and CPUs)
            # reserved until Ray shuts down (tests/test_tune.py). It also gives a local sweep
            # the same dashboard as a cluster; Ray moves to the next free port if 8265 is taken.
            kwargs["include_dashboard"] = True
            ray.init(address="local", **kwargs)  # never attach to a stray `ray start`
        else:
            ray.init(address=address, **kwargs)
    quiet_ray_data()
    resources = ray.cluster_resources()
    info = ClusterInfo(
        address=address or "local",
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        local=local,
        nodes=sum(1 for node in ray.nodes() if node.get("Alive")),
    )
    log.info("ray cluster: %s", info)
    return info


def pin_ray_data_actors() -> None:
    """Create Ray Data's two detached helper actors (its stats actor and its cluster-autoscaling
    coordinator, 0 CPU each) on this driver's node before any worker creates them.

    Ray Data creates them on the node of the first process that runs a dataset, and they outlive
    it. In a sweep that process is a trial on a worker node, and a node that holds a detached
    actor never counts as idle: the autoscaler never releases it (tests/test_autoscaling.py).
    Created here, they live beside the driver (on the head, for a job). Private Ray API: a
    warning, not an error, if it moves.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as err:
        log.warning("Ray Data's helper actors not placed on the driver's node (%s): the first "
                    "worker node that runs a dataset keeps them", err)
        return
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def worker_resources(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1.0
    return resources


def autoscaling() -> bool:
    """The cluster adds nodes on demand (``SSLMM_AUTOSCALING=1``): what is there now is not
    what a plan may use."""
    return os.environ.get("SSLMM_AUTOSCALING") == "1"


def check_fits(
    info: ClusterInfo, *, workers: int, cpus_per_worker: float, use_gpu: bool, what: str
) -> None:
    """Fail before anything runs when a plan cannot fit the cluster.

    On an autoscaling cluster the resources may not exist yet; the check applies to fixed-size
    clusters only (``SSLMM_AUTOSCALING=1`` turns it off).
    """
    if autoscaling():
        return
    need_cpu = workers * cpus_per_worker + DATA_HEADROOM_CPUS
    if need_cpu > info.cpus + 1e-9:
        raise UserError(
            f"{what} needs {need_cpu:g} logical CPUs ({workers} workers x {cpus_per_worker:g} "
            f"CPU + {DATA_HEADROOM_CPUS:g} for Ray Data) but the cluster has {info.cpus:g}; "
            "use fewer workers, a smaller --cpus-per-worker, or a bigger cluster "
            "(SSLMM_AUTOSCALING=1 if it autoscales)"
        )
    if use_gpu and workers > info.gpus:
        raise UserError(
            f"{what} needs {workers} GPUs but the cluster has {info.gpus:g}; "
            "drop --gpus or use fewer workers"
        )


def check_paths_reach_every_node(info: ClusterInfo, paths: dict[str, str | None]) -> None:
    """Refuse local paths that workers on other nodes would not see, before anything runs.

    On one node a local path is everywhere the workers are. On several (or an autoscaling
    cluster, which may add some) a worker would fail on it, and only after an epoch's work
    (the first checkpoint, the pretrained weights). A path on a filesystem every node mounts
    is fine: ``SSLMM_SHARED_FILESYSTEM=1`` says so.
    """
    from sslmm_ray import storage

    if (info.nodes <= 1 and not autoscaling()) or os.environ.get(SHARED_FILESYSTEM_ENV) == "1":
        return
    local = {what: path for what, path in paths.items() if path and not storage.is_remote(path)}
    if local:
        where = "an autoscaling cluster" if autoscaling() else f"a cluster of {info.nodes} nodes"
        listed = ", ".join(f"{what} {path}" for what, path in local.items())
        raise UserError(
            f"local path on {where}: {listed}; workers on other nodes cannot read or write "
            "it. Use an s3:// URI, or a filesystem every node mounts and set "
            f"{SHARED_FILESYSTEM_ENV}=1"
        )
