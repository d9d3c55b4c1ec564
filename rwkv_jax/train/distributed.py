"""Several processes, one job: JAX's multi-controller runtime (`jax.distributed`).

Every host runs the same train.py; each process owns its local devices, the mesh spans all of
them, and each process loads only its rows of every global batch. Nothing here launches
processes: SLURM (`srun`), Open MPI (`mpirun`) or Kubernetes start them, and
`jax.distributed.initialize()` finds its peers from their environment. By hand, give every
process `--config.dist.coordinator_address=HOST:PORT --config.dist.num_processes=N
--config.dist.process_id=I`.

Faults: JAX's coordination service watches every process's heartbeat; when one dies the
others are stopped once `dist.heartbeat_timeout` seconds pass without it (instead of hanging
in a collective until the cluster kills the job). Rerunning the same command resumes from the
newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("rwkv_jax")

# Environment variables by which the cluster managers JAX detects announce a multi-process job.
_CLUSTER_ENV = {
    "SLURM": ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE",),
}


def detected_cluster() -> str | None:
    """The cluster manager that started this process as one of several, if any."""
    for name, variables in _CLUSTER_ENV.items():
        for var in variables:
            try:
                if int(os.environ.get(var, "1")) > 1:
                    return name
            except ValueError:
                continue
    return None


def initialize(dist) -> bool:
    """Join the other processes of the job, if there are any; True when there are.

    `dist` is the config's `dist` section. With no coordinator given and no cluster detected
    this is a single-process run and nothing happens.
    """
    explicit = bool(dist.coordinator_address)
    cluster = detected_cluster()
    if not explicit and cluster is None:
        # Each process would train alone, on the whole batch, into the same run directory.
        asked = (f"dist.num_processes={dist.num_processes}" if dist.num_processes > 1 else
                 f"dist.process_id={dist.process_id}" if dist.process_id > 0 else None)
        if asked:
            raise ValueError(
                f"{asked} needs dist.coordinator_address=HOST:PORT (process 0's host, the same "
                f"on every process) or a cluster manager JAX detects (SLURM, Open MPI), and "
                f"there is neither; for one process leave dist.num_processes at 0 or 1")
        return False
    if explicit and (dist.num_processes < 1 or dist.process_id < 0):
        raise ValueError(
            f"dist.coordinator_address={dist.coordinator_address!r} needs dist.num_processes >= 1 "
            f"and dist.process_id >= 0 (got {dist.num_processes} and {dist.process_id})")
    # CPU devices talk through gloo across processes; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=int(dist.initialization_timeout),
                  heartbeat_timeout_seconds=int(dist.heartbeat_timeout))
    if explicit:
        kwargs.update(coordinator_address=dist.coordinator_address,
                      num_processes=int(dist.num_processes), process_id=int(dist.process_id))
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d (%s), %d local devices of %d", jax.process_index(),
             jax.process_count(), "by hand" if explicit else cluster, jax.local_device_count(),
             jax.device_count())
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def process_rows(sharding, global_shape: tuple[int, ...]) -> slice:
    """The rows (first dimension) of a global array that this process's devices hold.

    Each process loads just these rows of every batch; they must be one contiguous range,
    which the (data, fsdp) batch layout over a process-ordered mesh gives.
    """
    spans = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        spans.add((rows.start or 0, global_shape[0] if rows.stop is None else rows.stop))
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    if covered != set(range(lo, hi)):
        raise ValueError(f"process {jax.process_index()} holds rows {sorted(spans)} of the batch, "
                         "not one contiguous range; order the mesh so each process's devices "
                         "are adjacent along the data axes")
    return slice(lo, hi)
