"""Process-group set-up and the few collectives the pipeline needs (gloo on CPU, NCCL on CUDA).

A plain ``python -m earlybert_ds ...`` is a world of one; under the ``deepspeed`` launcher (or torchrun, SLURM)
the usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` variables are set for us.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from . import faults
from .config import ConfigError

logger = logging.getLogger("earlybert_ds")

#: How long a collective (and the rendezvous) may wait before the job fails instead of hanging.
#: Override with EARLYBERT_DIST_TIMEOUT (seconds). Measured with torch 2.13 (gloo): a rank that cannot reach
#: MASTER_ADDR:MASTER_PORT, or a rank 0 whose peers never arrive, fails after 1-2 timeouts; when the ranks meet but
#: cannot connect to each other (GLOO_SOCKET_IFNAME unset on a machine whose hostname resolves to a loopback
#: address), the rank refused fails at once and the rank waiting for its peers after about 5 timeouts.
DEFAULT_TIMEOUT_S = 600


#: DeepSpeed's CPU communication op, compiled on first use by every CPU ``init_distributed``.
SHM_OP = "deepspeed_shm_comm"
#: Beside torch's bare ``lock`` in the op's build directory: the lock every earlybert_ds process holds while it
#: builds or loads an op. An flock is released by the kernel when its holder dies, however it dies.
BUILD_FLOCK = "earlybert_build.flock"


class RendezvousError(ValueError):
    """The process group could not start (the ranks did not meet at MASTER_ADDR:MASTER_PORT in time, or could not
    connect to each other); the message says where and what to check."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cuda() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def device() -> torch.device:
    """This rank's accelerator (``cuda:LOCAL_RANK``), or the CPU: where work outside an engine runs."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (in place, on its device; the same result on every rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def init() -> tuple[int, int]:
    """Initialise the process group once; returns (rank, world size)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a single process started by hand
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        _jit_build_environment()
        if not on_cuda():
            build_cpu_ops()  # init_distributed then finds the op loaded (DeepSpeed keeps loaded ops)
        import deepspeed

        timeout = timedelta(seconds=float(os.environ.get("EARLYBERT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        if on_cuda():
            torch.cuda.set_device(local_rank())
        try:
            deepspeed.init_distributed(dist_backend="nccl" if on_cuda() else "gloo", timeout=timeout, verbose=False)
            if on_cuda():  # NCCL connects at its first collective: a failure to start shows here, explained
                dist.barrier(device_ids=[local_rank()])
        except RuntimeError as e:
            if not isinstance(e, dist.DistError) and "connectFullMesh" not in str(e):
                raise
            raise start_error(e, timeout.total_seconds()) from e
        if not on_cuda():
            _unlink_shm_segment()
    return dist.get_rank(), dist.get_world_size()


def _jit_build_environment() -> None:
    """Build DeepSpeed's just-in-time ops once per Python environment, with that environment's ``ninja``.

    Two ninja versions (a system one and the PyPI one DeepSpeed depends on) do not recognise each other's build logs,
    and two environments (other torch or DeepSpeed versions) do not share builds: either way, a job started the other
    way rebuilt the CPU communication op from scratch, about a minute per rank (``launch/*.sh`` put the environment's
    ``bin/`` first on PATH, a bare ``.venv/bin/earlybert-ds`` does not). ``TORCH_EXTENSIONS_DIR`` still overrides.
    """
    chosen = extensions_dir(Path(sys.prefix))
    if chosen is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(chosen))
    here = Path(sys.executable).parent
    if (here / "ninja").is_file() and shutil.which("ninja") != str(here / "ninja"):
        os.environ["PATH"] = os.pathsep.join([str(here), os.environ.get("PATH", "")])


def extensions_dir(prefix: Path) -> Path | None:
    """``PREFIX/torch_extensions`` where this process can write there, else None (torch's default, under
    ``~/.cache``): a shared, read-only Python environment (a conda module, a system site) would make every
    just-in-time build fail with PermissionError."""
    path = prefix / "torch_extensions"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return None
    return path


def build_cpu_ops() -> None:
    """Compile (or load) DeepSpeed's CPU communication op under :func:`build_guard`: in ``launch/setup.sh``, so that
    the first job does not pay the build, and in every CPU :func:`init`, before the ranks meet."""
    _jit_build_environment()
    from deepspeed.comm.torch import build_shm_op

    with build_guard(SHM_OP):
        build_shm_op()


def build_op(builder_name: str) -> None:
    """Compile (or load) DeepSpeed's op of ``builder_name`` (e.g. ``FusedAdamBuilder``) under :func:`build_guard`,
    before ``deepspeed.initialize`` asks for it: the engine then finds it loaded (DeepSpeed keeps loaded ops)."""
    _jit_build_environment()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    with build_guard(builder.name):
        builder.load()


@contextlib.contextmanager
def build_guard(op: str) -> Iterator[None]:
    """Hold this environment's build lock of ``op`` (an flock on ``BUILD_FLOCK``) while DeepSpeed builds or loads it.

    torch guards a just-in-time build with a bare ``lock`` file and waits for it to vanish, silently and forever; a
    process killed during the build leaves it behind. Every earlybert_ds process builds under the flock, which dies
    with its holder, so a torch lock found while holding it was left by a killed build, whatever its age: it is
    removed, saying so. Waiting for a live builder says whom it waits for.
    """
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(op, verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / BUILD_FLOCK, "a+") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            guard.seek(0)
            logger.warning("waiting for %s, which is building DeepSpeed's %s op in %s (a build takes about a "
                           "minute)", guard.read().strip() or "another process", op, build_dir)
            fcntl.flock(guard, fcntl.LOCK_EX)
        guard.seek(0), guard.truncate(), guard.write(f"process {os.getpid()} on {socket.gethostname()}")
        guard.flush()
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("%s: removed, left by a build of DeepSpeed's %s op that was killed (no live earlybert_ds "
                           "build holds %s); torch would have waited on it forever", stale, op, BUILD_FLOCK)
            stale.unlink(missing_ok=True)
        yield


def _unlink_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment (about 69 MB) once every rank has mapped every segment.

    When all ranks are on one machine, DeepSpeed's CPU backend (0.19) creates one segment per rank in
    ``init_distributed``, ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``, and never
    unlinks it: every job would leave ranks x 69 MB of RAM in /dev/shm until reboot, and a full /dev/shm makes later
    jobs die of SIGBUS or hang. Unlinked after the barrier, the mappings stay valid and the memory is freed when the
    job ends, however it ends.
    """
    if dist.get_world_size() > 1:
        dist.barrier()  # each rank maps its peers' segments inside init_distributed: after this, all are mapped
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    Path(f"/dev/shm/{name}_{dist.get_rank()}").unlink(missing_ok=True)


def start_error(e: RuntimeError, timeout_s: float) -> RendezvousError:
    """A failed start of the process group, explained: a failed rendezvous (the TCPStore at MASTER_ADDR:MASTER_PORT:
    DistNetworkError when it cannot be reached, DistStoreError when peers never arrive), a failed gloo mesh (the
    ranks met but cannot reach each other at the addresses they advertise), or NCCL failing to connect the GPUs
    (DistBackendError: the ranks met; the hostfile and MASTER_ADDR are not the problem)."""
    env, lines = os.environ, [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    reason = lines[0].rstrip(".")
    if isinstance(e, dist.DistBackendError) and "nccl" in str(e).lower():
        last = f" ({lines[-1].rstrip('.')})" if len(lines) > 1 else ""  # NCCL's "Last error: ..." names the call
        return RendezvousError(
            f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')}: NCCL could not connect the GPUs: "
            f"{reason}{last}. "
            "The ranks met at MASTER_ADDR:MASTER_PORT, so the hostfile and MASTER_ADDR are not the problem. Rerun with "
            "NCCL_DEBUG=INFO to see the interfaces and transports NCCL tried; on nodes with several network "
            "interfaces set NCCL_SOCKET_IFNAME to the one the nodes reach each other on (see `ip -brief addr`), and "
            "without InfiniBand set NCCL_IB_DISABLE=1")
    where = (f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} could not join the job at "
             f"MASTER_ADDR:MASTER_PORT = {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')} "
             f"(EARLYBERT_DIST_TIMEOUT = {timeout_s:g} s): {type(e).__name__}: {reason}. ")
    if isinstance(e, dist.DistError):
        return RendezvousError(where + "Check that every node was started with the same hostfile, MASTER_ADDR (node "
                               "0's address as the other nodes reach it) and MASTER_PORT (free on node 0, open between "
                               "the nodes)")
    try:
        own = f"here {socket.gethostname()!r} resolves to {socket.gethostbyname(socket.gethostname())}"
    except OSError as err:
        own = f"here it does not resolve ({err})"
    return RendezvousError(where + "The ranks met but could not connect to each other: each rank advertises the "
                           "address of GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs), by default the address its "
                           f"hostname resolves to ({own}); set it on every node to the network interface the nodes "
                           "reach each other on (see `ip -brief addr`)")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled: only for objects this program made itself)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankFailure(ValueError):
    """Raised on every other rank when rank 0 failed in :func:`on_rank0`; the message is rank 0's error."""


def on_rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on rank 0 alone, its result on every rank (a collective: every rank must call it).

    An exception on rank 0, of any type, is re-raised there and reaches every other rank as a
    :class:`RankFailure` with rank 0's message, so that no rank waits in the next collective for a rank 0 that has
    failed (under ``--no_ssh`` or SLURM, the other nodes would otherwise wait out ``EARLYBERT_DIST_TIMEOUT``).
    """
    result, error, failure = None, "", None
    if rank() == 0:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure, error = e, str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
    result, error = broadcast_object((result, error))
    if failure is not None:
        raise failure
    if error:
        raise RankFailure(f"rank 0 failed: {error}")
    return result


def wait_for_keys(keys: list[str], what: str, every_s: float = 60.0) -> list[str]:
    """The values of ``keys`` in the job's key-value store, waiting as long as it takes for them to be set.

    Not bounded by ``EARLYBERT_DIST_TIMEOUT``, as every collective is: preparing a large corpus takes longer than
    any sensible collective timeout, and a rank timing out would bring the job down mid-preparation, again on
    every retry. Says ``what`` it waits for after a second, then every ``every_s`` seconds. A dead rank 0 (which
    holds the store) still fails the wait at once; a dead rank elsewhere is noticed by its launcher.
    """
    store = dist.distributed_c10d._get_default_store()
    t0, wait_s = time.monotonic(), 1.0
    while True:
        try:
            store.wait(keys, timedelta(seconds=wait_s))
            break
        except dist.DistStoreError as e:
            if "timeout" not in str(e).lower():
                raise
            logger.warning("rank %d: waiting for %s (%.0f s so far; not bounded by EARLYBERT_DIST_TIMEOUT)", rank(),
                           what, time.monotonic() - t0)
            wait_s = every_s
    return [store.get(k).decode() for k in keys]


def set_key(key: str, value: str) -> None:
    """Set ``key`` in the job's key-value store (see :func:`wait_for_keys`)."""
    dist.distributed_c10d._get_default_store().set(key, value)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled: only for objects this program made itself)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective."""
    return all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def shutdown() -> None:
    """Leave the process group cleanly (reduces gloo's flaky 'terminate called' exits)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def full_fp32(param: torch.nn.Parameter, optimizer: Any = None) -> torch.Tensor:
    """A parameter in full and in fp32, on CPU: the optimizer's master copy under mixed precision (the bf16/fp16
    module copy cannot resolve small updates: bf16's spacing near 1.0 is 2^-7), gathered under ZeRO-3.
    A collective under ZeRO (every rank must call it, in the same order)."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3
        full = safe_get_full_fp32_param(param)
    else:  # ZeRO-0: DeepSpeed's (un)fused mixed-precision wrappers keep fp32 copies beside the bf16/fp16 groups
        full = _zero0_master(param, optimizer)
    if full is None:  # plain fp32 training keeps no separate master copy
        with zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
            full = param.detach().clone()
    return full.detach().float().cpu()


def full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's full gradient of this step (averaged over ranks), in fp32 on CPU, between the step's last
    backward and its optimizer step: partitioned under ZeRO-1/2/3 and gathered here (DeepSpeed's
    ``safe_get_full_grad``), so a collective there. Under fp16 it still carries the loss scale."""
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    return torch.zeros(param.ds_shape if hasattr(param, "ds_shape") else param.shape) if grad is None else \
        grad.detach().float().cpu()


def _zero0_master(param: torch.nn.Parameter, optimizer: Any) -> torch.Tensor | None:
    for gi, group in enumerate(getattr(optimizer, "fp16_groups", None) or ()):
        offset = 0
        for pi, p in enumerate(group):
            if p is param:
                if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 tensor per parameter
                    return optimizer.fp32_groups[gi][pi]
                return optimizer.fp32_groups_flat[gi].narrow(0, offset, p.numel()).view_as(p)  # FP16_Optimizer
            offset += p.numel()
    return None


# ---- the job's shared places: its output directory, each node's cache --------------------------------------------

@contextlib.contextmanager
def claim_output_dir(output_dir: str, resuming: bool, run_marker: str) -> Iterator[Path]:
    """Hold the output directory for this run: refuse one that holds another run (its file ``run_marker``, unless
    resuming) or that a live run is using (an flock on ``OUTPUT/.lock``, released when this run ends, however it
    ends)."""
    out = Path(output_dir)
    held: list[Any] = []  # rank 0's open lock file

    def claim() -> tuple[str, str]:
        token = f"{socket.gethostname()}:{os.getpid()}"
        out.mkdir(parents=True, exist_ok=True)
        held.append(lock := open(out / ".lock", "a+"))  # noqa: SIM115 - closed below
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.seek(0), lock.truncate(), lock.write(token), lock.flush()
            os.fsync(lock.fileno())  # other nodes read it next
        except BlockingIOError:
            lock.seek(0)
            return f"{out} is in use by a live run ({lock.read().strip() or '?'}); choose another --output-dir", token
        if (out / run_marker).exists() and not resuming:
            return (f"{out} already holds a run; pass --resume to continue it, or choose another --output-dir "
                    "(nothing was changed)"), token
        return "", token

    try:
        problem, token = on_rank0(claim)
        if problem:
            raise ConfigError(problem)
        _check_shared(out, token)
        yield out
    finally:
        for lock in held:
            lock.close()


def _check_shared(out: Path, token: str) -> None:
    """Every rank must see rank 0's output directory: checkpoints, the ticket and --resume depend on it."""
    try:
        sees = (out / ".lock").read_text() == token
    except OSError:
        sees = False
    blind = [r for r, ok in enumerate(all_gather_object((sees, socket.gethostname()))) if not ok[0]]
    if blind:
        raise ConfigError(f"--output-dir {out} is not the same directory on every node: rank(s) {blind} do not see "
                          "rank 0's; checkpoints, the ticket and --resume need one shared directory at the same path")


_node_once_calls = itertools.count()  # every rank calls node_once in the same order: the calls' keys agree


def node_once(fn: Callable, *args: Any) -> Any:
    """Run ``fn`` on each node's local rank 0 first (it fills the node's cache), then on the other ranks; a failure
    anywhere fails every rank with the same message instead of leaving some waiting at a barrier.

    The other ranks wait in the job's key-value store, not in a collective: preparing a large corpus may take longer
    than ``EARLYBERT_DIST_TIMEOUT``, and they log that they are waiting (:func:`wait_for_keys`)."""
    if world_size() == 1:
        return fn(*args)
    call = next(_node_once_calls)
    leaders = [r for r, local in enumerate(all_gather_object(local_rank())) if local == 0]
    result, error = None, ""
    if local_rank() == 0:
        faults.slow("node_once")  # a corpus that takes longer than the collective timeout
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            logger.debug("failed on this rank", exc_info=True)
            error = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        set_key(f"earlybert/node_once/{call}/{rank()}", error)
    errors = wait_for_keys([f"earlybert/node_once/{call}/{r}" for r in leaders],
                                f"local rank 0 of every node (ranks {leaders}) to finish {fn.__name__}")
    if any(errors):
        raise ValueError(next(e for e in errors if e))
    return result if local_rank() == 0 else fn(*args)
