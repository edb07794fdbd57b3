"""Several processes as one job: ``mx.distributed`` under ``mlx.launch`` (ring, JACCL or MPI).

Three ways to split a generation across the group (``--parallel``):

* ``cfg``: process r computes true-CFG branch r % 2 (cond / uncond) of image r // 2; each step
  ends with one ``all_gather`` of the velocity (see ``CfgSplit``).
* ``seeds``: the seeds are dealt round-robin to the processes; rank 0 gathers the images and
  writes every file (see ``split_seeds`` / ``gather_images``).
* ``tensor``: the transformer's linears are sharded with MLX's own
  ``mlx.nn.layers.distributed`` layers (see ``shard_transformer``); each process reads only its
  slices of a converted checkpoint from disk (``read_sharded``).

Failure handling. MLX's ring backend raises ``RuntimeError("[ring] ...")`` in a process whose
peer went away, so a dead rank ends the others' collectives at once. Two things remain:

* a rank that fails *between* collectives (bad input, a corrupt shard) must not leave the
  others waiting in their next one: ``World.agree`` is a checkpoint where every rank reports
  ok or its one-line error (one ``all_gather`` of a fixed-size message), and all raise together;
* a peer that never comes up (or stops answering) would leave ``init`` or a collective waiting
  forever: a watchdog ends the process after ``QWEN_MLX_DIST_TIMEOUT`` seconds (default 600)
  with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import (
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
    shard_linear,
)

from qwen_mlx.errors import CheckpointError, QwenMLXError
from qwen_mlx.io import list_shards, safetensors_header
from qwen_mlx.messages import ignored_memory_limit, one_line
from qwen_mlx.quantize import GROUP_SIZE

PARALLEL_MODES = ("auto", "cfg", "seeds", "tensor")
TIMEOUT_ENV = "QWEN_MLX_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
MESSAGE_BYTES = 512  # one error line per rank in a checkpoint's all_gather


class DistributedError(QwenMLXError):
    """Another process of the job failed (or stopped answering)."""


def launched() -> bool:
    """True when this process was started as one rank of a group (mlx.launch or by hand)."""
    return any(
        os.environ.get(k)
        for k in ("MLX_HOSTFILE", "MLX_IBV_DEVICES", "OMPI_COMM_WORLD_SIZE", "MLX_WORLD_SIZE")
    )


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def peer_lost(error: BaseException) -> bool:
    """True for the error MLX's backends raise when another process went away."""
    return isinstance(error, RuntimeError) and bool(
        re.match(r"^\[(ring|jaccl|mpi|nccl)\]", str(error))
    )


# ----------------------------------------------------------------------------- the watchdog


class Watchdog:
    """Ends the process (``os._exit(1)``, one line on stderr) when a guarded wait runs past its
    deadline: the only way out of a collective whose peers never answer."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._what = ""
        self._seconds = 0.0
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                what, seconds = self._what, self._seconds
            if expired:
                sys.stderr.write(_timeout_message(self.rank, seconds, what) + "\n")
                sys.stderr.flush()
                os._exit(1)

    @contextmanager
    def guard(self, what: str, seconds: float | None = None) -> Iterator[None]:
        seconds = timeout_seconds() if seconds is None else seconds
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qwen-mlx-watchdog")
            self._thread.daemon = True
            self._thread.start()
        with self._lock:
            outer = (self._deadline, self._what, self._seconds)
            self._deadline = time.monotonic() + seconds
            self._what, self._seconds = what, seconds
        try:
            yield
        finally:
            with self._lock:  # an enclosing guard's clock restarts: this one made progress
                deadline, self._what, self._seconds = outer
                self._deadline = None if deadline is None else time.monotonic() + outer[2]


_WORLD: World | None = None  # this process's group, joined once

_WATCHER = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
    sys.stderr.write(message + chr(10))
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


def _timeout_message(rank: int, seconds: float, what: str) -> str:
    return (
        f"qwen-mlx: error: rank {rank}: no answer from the other processes after "
        f"{seconds:.0f} s while {what} (set {TIMEOUT_ENV} to wait longer)"
    )


@contextmanager
def _process_watch(rank: int, what: str, seconds: float | None = None) -> Iterator[None]:
    """Like ``Watchdog.guard`` for a call that holds the GIL: a separate process ends this one
    after the deadline (SIGKILL: no Python handler could run); closing its stdin (the call
    returned, or this process died) ends the watcher."""
    import subprocess

    seconds = timeout_seconds() if seconds is None else seconds
    watcher = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()), str(seconds),
         _timeout_message(rank, seconds, what)],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield
    finally:
        watcher.stdin.close()
        watcher.wait()


# ----------------------------------------------------------------------------- the group


class World:
    """This process's place in the job: the group, its rank and size, and the collectives the
    pipeline uses, each guarded by the watchdog and turning a lost peer into DistributedError.

    A group of one (no launcher) is valid: every method then does the local thing.
    """

    def __init__(self, group: mx.distributed.Group | None = None) -> None:
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.watchdog = Watchdog(self.rank)

    @classmethod
    def init(cls, backend: str = "any") -> World:
        """Join the group ``mlx.launch`` set up (a group of one without it).

        Joining waits for every peer, inside MLX and holding the GIL (no Python thread runs
        meanwhile), so a small watcher process ends this one if a peer never comes up.
        """
        global _WORLD
        if _WORLD is not None:  # once per process: a second init would join again
            return _WORLD
        if not launched():
            return cls(None)
        rank = int(os.environ.get("MLX_RANK", "0") or 0)
        with _process_watch(rank, "joining the group"):
            group = mx.distributed.init(strict=True, backend=backend)
        _WORLD = cls(group if group.size() > 1 else None)
        return _WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def print(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    # -- collectives

    def run(self, arrays, what: str, seconds: float | None = None):
        """Evaluate ``arrays`` (which hold collectives) under the watchdog (``seconds``: its
        limit, default ``QWEN_MLX_DIST_TIMEOUT``; ``math.inf``: wait for ever); a lost peer
        becomes a DistributedError."""
        try:
            with self.watchdog.guard(what, seconds):
                mx.eval(arrays)
        except RuntimeError as e:
            if peer_lost(e):
                raise DistributedError(
                    f"another process of the job failed or stopped while {what}"
                ) from e
            raise
        return arrays

    def all_gather(
        self, x: mx.array, what: str = "exchanging results", seconds: float | None = None
    ) -> mx.array:
        """(size * x.shape[0], ...) : every rank's ``x`` stacked along axis 0, evaluated."""
        if not self.distributed:
            return x
        return self.run(mx.distributed.all_gather(x, group=self.group), what, seconds)

    def all_sum(self, x: mx.array, what: str = "exchanging results") -> mx.array:
        if not self.distributed:
            return x
        return self.run(mx.distributed.all_sum(x, group=self.group), what)

    def all_max(
        self, x: mx.array, what: str = "exchanging results", seconds: float | None = None
    ) -> mx.array:
        if not self.distributed:
            return x
        return self.run(mx.distributed.all_max(x, group=self.group), what, seconds)

    def gather_images(
        self, image: np.ndarray | None, shape: tuple[int, ...], what: str = "gathering images"
    ) -> list[np.ndarray | None]:
        """Every rank's uint8 ``image`` (of ``shape``; None: this rank has none this round), in
        rank order, on every rank (one ``all_gather``; rank 0 is the one that writes them)."""
        if not self.distributed:
            return [image]
        buf = np.zeros((1, 1 + int(np.prod(shape))), dtype=np.uint8)
        if image is not None:
            if tuple(image.shape) != tuple(shape):
                raise ValueError(f"image of shape {image.shape}, expected {shape}")
            buf[0, 0] = 1
            buf[0, 1:] = image.astype(np.uint8).reshape(-1)
        rows = np.array(self.all_gather(mx.array(buf), what))
        return [row[1:].reshape(shape) if row[0] else None for row in rows]

    def broadcast_json(self, value, what: str = "sharing the request", seconds=None):
        """Rank 0's JSON-able ``value`` on every rank (e.g. seeds rank 0 drew at random).
        ``seconds``: how long the others may wait for rank 0 (``math.inf``: a server's
        followers waiting for the next job)."""
        if not self.distributed:
            return value
        return self.gather_json(value if self.is_main else None, what, seconds)[0]

    def gather_json(self, value, what: str = "gathering results", seconds=None) -> list:
        """Every rank's JSON-able ``value``, in rank order, on every rank (one ``all_max`` of
        the lengths, one ``all_gather``)."""
        if not self.distributed:
            return [value]
        data = json.dumps(value).encode()
        size = mx.array([len(data)], dtype=mx.int32)
        n = int(np.array(self.all_max(size, what, seconds))[0])
        buf = np.zeros((1, n + 4), dtype=np.uint8)
        buf[0, :4] = np.frombuffer(np.array([len(data)], dtype="<u4").tobytes(), dtype=np.uint8)
        buf[0, 4 : 4 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = np.array(self.all_gather(mx.array(buf), what, seconds))
        out = []
        for row in rows:
            size = int(np.frombuffer(row[:4].tobytes(), dtype="<u4")[0])
            out.append(json.loads(bytes(row[4 : 4 + size]).decode()))
        return out

    def check_same(self, text: str, what: str = "the request") -> None:
        """Raise on every rank unless every rank holds the same ``text`` (a request's
        description): the processes must have been started with the same command."""
        if not self.distributed:
            return
        digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)
        rows = np.array(self.all_gather(mx.array(digest)[None], f"comparing {what}"))
        differ = [r for r in range(self.size) if not np.array_equal(rows[r], rows[0])]
        if differ:
            raise DistributedError(
                f"rank {differ[0]} got a different {what} than rank 0: start every process "
                f"with the same command and files"
            )

    # -- checkpoints

    def check(self, error: BaseException | None, what: str) -> None:
        """Every rank reports ok or its error; all raise if any failed (this rank its own
        error, the others a DistributedError naming the first failed rank)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        buf = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
        if error is not None:
            text = one_line(error).encode("utf-8", "replace")[: MESSAGE_BYTES - 2]
            buf[0] = 1
            buf[1 : 1 + len(text)] = np.frombuffer(text, dtype=np.uint8)
        rows = np.array(self.all_gather(mx.array(buf)[None], what))
        if error is not None:
            error.reported_to_peers = True  # rank 0 prints it: see ``report_errors``
            raise error
        for rank, row in enumerate(rows):
            if row[0]:
                text = bytes(row[1:]).rstrip(b"\0").decode("utf-8", "replace")
                error = DistributedError(f"rank {rank} failed while {what}: {text}")
                error.in_step = True  # every rank raises it together
                raise error

    @contextmanager
    def agree(self, what: str) -> Iterator[None]:
        """Run the block on every rank, then meet: if it raised anywhere, it raises everywhere.

        Only ``Exception``s are reported; an interrupt ends the process (the peers see the lost
        connection)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported to the peers, then re-raised
            self.check(e, what)
            raise
        self.check(None, what)


def in_step(error: BaseException) -> bool:
    """True when every rank raised ``error`` at the same point (a checkpoint, a shared cancel):
    the group is still in step and can run its next job (a server goes on)."""
    return bool(getattr(error, "in_step", False) or getattr(error, "reported_to_peers", False))


class SharedCancel:
    """A cancel token every rank sees: ``check()`` (before every step and every decode, the
    same number of times on every rank) is one ``all_max`` of the ranks' flags, so a cancel on
    any rank (a server's rank 0; any rank of a script) makes every rank raise ``Cancelled`` at
    the same step, and the group stays in step. ``local``: this rank's token (None: never
    cancelled here, a server's followers)."""

    def __init__(self, world: World, local=None) -> None:
        self.world, self.local = world, local

    @property
    def cancelled(self) -> bool:
        return self.local is not None and self.local.cancelled

    def check(self) -> None:
        from qwen_mlx.errors import Cancelled

        flag = mx.array([int(self.cancelled)], dtype=mx.int32)
        if int(np.array(self.world.all_max(flag, "checking for a cancel"))[0]):
            reason = getattr(self.local, "reason", "cancelled") if self.cancelled else "cancelled"
            error = Cancelled(reason)
            error.in_step = True
            raise error


def error_line(e: BaseException, world: World | None = None) -> str | None:
    """How a process of a job reports ``e``: the line (None: say nothing, rank 0 reports it).
    Rank 0 says it all (its own error, or which rank failed and why); another rank only what
    rank 0 cannot know (its own error outside a checkpoint). A lost peer reads as such."""
    world = world or _WORLD
    rank = world.rank if world is not None else 0
    if isinstance(e, KeyboardInterrupt):
        text = "interrupted"
    elif peer_lost(e):
        text = "another process of the job failed or stopped (lost the connection to it)"
    else:
        text = one_line(e)
    if rank == 0:
        return text
    if isinstance(e, DistributedError) or peer_lost(e) or in_step(e):  # rank 0 reports it
        return None
    return f"rank {rank}: {text}"


@contextmanager
def report_errors(world: World, prog: str = "qwen-mlx") -> Iterator[None]:
    """Turn any failure into ``error_line``'s line on stderr and exit status 1, on every
    rank (scripts and workers; the CLI has its own exit codes)."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place errors end
        line = error_line(e, world)
        if line is not None:
            sys.stderr.write(f"{prog}: error: {line}\n")
            sys.stderr.flush()
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------- work splits


def choose_mode(
    mode: str,
    size: int,
    *,
    fits: bool,
    true_cfg: bool,
    seeds: int,
    config: dict,
    serving: bool = False,
) -> str | None:
    """The parallel mode a job of ``size`` processes runs (None: one process, nothing to
    split), or a one-line ValueError saying why ``mode`` cannot.

    auto: tensor when one process's memory plan does not fit; else cfg under true CFG (an even
    number of processes); else seeds when there are several; else refuse (``serving``: seeds,
    rank 0 making the one image while the others keep step: a server takes every request).
    """
    check_parallel(mode)
    if size == 1:
        return None
    if mode == "auto":
        if not fits:
            mode = "tensor"
        elif true_cfg and size % 2 == 0:
            mode = "cfg"
        elif seeds > 1 or serving:
            mode = "seeds"
        else:
            raise ValueError(
                f"--parallel auto: nothing to split across {size} processes (the model fits one "
                f"process, {'CFG is off' if not true_cfg else 'the process count is odd'} and "
                f"there is one seed); pass several --seed, or --parallel tensor"
            )
    if mode == "cfg":
        if not true_cfg:
            raise ValueError(
                "--parallel cfg splits the two true-CFG branches: it needs --cfg above 1 and a "
                "negative prompt"
            )
        CfgSplit(0, size)  # an even process count
    elif mode == "seeds" and seeds < 2 and not serving:
        raise ValueError("--parallel seeds needs at least two seeds (repeat --seed)")
    elif mode == "tensor":
        check_tensor_parallel(config, size)
    return mode


def check_parallel(mode: str) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    return mode


def split_seeds(seeds: Sequence[int], rank: int, size: int) -> list[int]:
    """This rank's seeds, dealt round-robin (seed i goes to rank i % size)."""
    return [s for i, s in enumerate(seeds) if i % size == rank]


@dataclass(frozen=True)
class CfgSplit:
    """Which rows of a true-CFG batch ``[cond rows; uncond rows]`` this rank computes: the
    Denoiser's per-step hook (``Denoiser.cfg_split``).

    Rank r computes branch r % 2 of image r // 2 (``pairs`` = size // 2 images at a time);
    ``gather`` stitches the pair's two velocities back together with one ``all_gather``.
    """

    rank: int
    size: int
    world: World | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 2 or self.size % 2:
            raise ValueError(
                f"--parallel cfg needs an even number of processes (one per CFG branch), "
                f"got {self.size}"
            )

    @classmethod
    def of(cls, world: World) -> CfgSplit:
        return cls(world.rank, world.size, world)

    @property
    def branch(self) -> int:
        """0: the conditional (prompt) branch; 1: the unconditional (negative prompt) one."""
        return self.rank % 2

    @property
    def pair(self) -> int:
        return self.rank // 2

    @property
    def pairs(self) -> int:
        return self.size // 2

    def rows(self, batch: int) -> slice:
        """This rank's rows of a ``[cond (batch rows); uncond (batch rows)]`` CFG batch."""
        return slice(self.branch * batch, (self.branch + 1) * batch)

    def gather(self, v: mx.array) -> tuple[mx.array, mx.array]:
        """(cond, uncond) velocity of this rank's image(s), from every rank's branch ``v``:
        one ``all_gather`` (each process sends its ``v`` to the others)."""
        rows = self.world.all_gather(v, "exchanging the CFG velocities")
        b = v.shape[0]
        start = 2 * self.pair * b
        return rows[start : start + b], rows[start + b : start + 2 * b]


# ----------------------------------------------------------------------------- tensor parallel

# How each transformer weight is split (MLX's two shardings; everything else is replicated):
# "all-to-sharded" splits a linear's outputs (axis 0), "sharded-to-all" its inputs (last axis)
# and sums the partial products with one all_sum.
ALL_TO_SHARDED = re.compile(
    r"^blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)|(img|txt)_mlp\.up)$"
)
SHARDED_TO_ALL = re.compile(r"^blocks\.\d+\.(attn\.(to_out|to_add_out)|(img|txt)_mlp\.down)$")
# The modulation linears (a third of the parameters) see the same timestep vector on every rank:
# each rank multiplies its slice of it by its input slice of the weight, one all_sum adds them.
MODULATION = re.compile(r"^blocks\.\d+\.(img|txt)_mod$")


class _SliceInput:
    """Mixin: a sharded-to-all linear fed the full (replicated) input takes its own slice."""

    def __call__(self, x: mx.array) -> mx.array:
        n, r = self.group.size(), self.group.rank()
        width = x.shape[-1] // n
        return super().__call__(x[..., r * width : (r + 1) * width])


class ReplicatedInputShardedLinear(_SliceInput, ShardedToAllLinear):
    """``ShardedToAllLinear`` for an input every rank holds in full (the modulation linears)."""


class QuantizedReplicatedInputShardedLinear(_SliceInput, QuantizedShardedToAllLinear):
    """The quantized ``ReplicatedInputShardedLinear``."""


def layer_sharding(path: str) -> str | None:
    """ "all-to-sharded", "sharded-to-all", "modulation" or None (replicated) for a layer."""
    if ALL_TO_SHARDED.match(path):
        return "all-to-sharded"
    if SHARDED_TO_ALL.match(path):
        return "sharded-to-all"
    if MODULATION.match(path):
        return "modulation"
    return None


def weight_axis(name: str) -> int | None:
    """The axis along which the weight ``name`` (``<layer>.<param>``) is split, None if every
    rank holds it whole. Matches ``mlx.nn.layers.distributed``'s own predicates: outputs split
    along axis 0 (bias too), inputs along the last axis (packed weight, scales and biases of a
    quantized layer too; the bias, added after the sum, whole)."""
    layer, _, param = name.rpartition(".")
    kind = layer_sharding(layer)
    if kind is None:
        return None
    if kind == "all-to-sharded":
        return 0
    return None if param == "bias" else -1


def check_tensor_parallel(config: dict, size: int, quantize: int | None = None) -> None:
    """One-line ValueError unless a transformer with ``config`` (quantized, or to be quantized
    at load when ``quantize``) splits over ``size`` ranks."""
    heads = int(config.get("num_attention_heads", 24))
    head_dim = int(config.get("attention_head_dim", 128))
    if heads % size:
        raise ValueError(
            f"--parallel tensor splits the {heads} attention heads across the processes: "
            f"{size} processes do not divide them (use one of "
            f"{[n for n in range(2, heads + 1) if heads % n == 0]})"
        )
    quant = config.get("quantization") or {}
    group = int(quant.get("group_size", GROUP_SIZE) or GROUP_SIZE)
    width = heads * head_dim
    if (quant or quantize) and (width // size) % group:
        raise ValueError(
            f"--parallel tensor: each process's slice of a quantized layer ({width // size} "
            f"inputs) must be a multiple of the quantization group size {group}"
        )


def shard_transformer(model: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """Tensor parallelism for a ``QwenImageTransformer`` (in place), with MLX's own layers.

    Attention is split by heads: q/k/v of both streams all-to-sharded (each rank computes
    heads / N heads), the two output projections sharded-to-all; each MLP up all-to-sharded,
    down sharded-to-all; the modulation linears (diffusers' plan replicates them, a third of the
    parameters) sharded-to-all over their replicated input. A quantized layer becomes MLX's
    quantized sharded layer (quantize first, then shard). The small input/output layers and the
    time embedding stay whole. Collectives per block: 4 all_sums of activations (+ 2 small ones
    for the modulation).
    """
    size = group.size()
    check_tensor_parallel({"num_attention_heads": model.config.num_attention_heads}, size)
    for block in model.blocks:
        attn = block.attn
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        for name in ("to_out", "to_add_out"):
            setattr(attn, name, shard_linear(getattr(attn, name), "sharded-to-all", group=group))
        attn.heads //= size
        for mlp in (block.img_mlp, block.txt_mlp):
            mlp.up = shard_linear(mlp.up, "all-to-sharded", group=group)
            mlp.down = shard_linear(mlp.down, "sharded-to-all", group=group)
        for name in ("img_mod", "txt_mod"):
            if name in block:
                setattr(block, name, _shard_modulation(block[name], group))
    return model


def _shard_modulation(layer: nn.Module, group: mx.distributed.Group) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return ReplicatedInputShardedLinear.from_linear(layer, group=group)
    return QuantizedReplicatedInputShardedLinear.from_quantized_linear(layer, group=group)


# ----------------------------------------------------------------------------- reading slices

_NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _part(n: int, rank: int, size: int, what: str) -> slice:
    if n % size:
        raise CheckpointError(f"{what}: {n} cannot be split into {size} equal parts")
    step = n // size
    return slice(rank * step, (rank + 1) * step)


def read_sharded(
    folder: str | Path,
    rank: int,
    size: int,
    axis_of: Callable[[str], int | None] = weight_axis,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, mx.array]:
    """This rank's slice of every tensor in a converted component folder, read from disk.

    Each tensor is memory-mapped and only this rank's rows (a contiguous range) or columns (one
    range per row) are copied out, so a process allocates ~1/N of the sharded weights and never
    the rest. ``axis_of(name)`` gives the split axis (None: read whole); ``keep(name)`` filters.
    """
    out: dict[str, mx.array] = {}
    for shard in list_shards(Path(folder)):
        header = safetensors_header(shard)
        with open(shard, "rb") as f:
            base = 8 + int.from_bytes(f.read(8), "little")
        for name, entry in header.items():
            if keep is not None and not keep(name):
                continue
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            if dtype not in _NUMPY:
                raise CheckpointError(f"{shard}: tensor {name!r} has unsupported dtype {dtype}")
            start = entry["data_offsets"][0]
            if not shape or 0 in shape:
                data = np.zeros(shape, dtype=_NUMPY[dtype])
            else:
                mm = np.memmap(shard, _NUMPY[dtype], "r", offset=base + start, shape=shape)
                axis = axis_of(name)
                index = [slice(None)] * len(shape)
                if axis is not None:
                    axis %= len(shape)
                    index[axis] = _part(shape[axis], rank, size, f"{shard}: {name}")
                data = np.ascontiguousarray(mm[tuple(index)])
                del mm
            array = mx.array(data)
            if dtype == "BF16":
                array = array.view(mx.bfloat16)
            out[name] = array
    return out


def shard_weights(
    weights: dict[str, mx.array],
    rank: int,
    size: int,
    axis_of: Callable[[str], int | None] = weight_axis,
) -> dict[str, mx.array]:
    """This rank's slices of an in-memory (lazy) weight dict: the path for checkpoints that are
    converted as they load, or weights a LoRA was fused into. Each slice is evaluated at once
    and the full tensor dropped, so the full weights are never all resident."""
    out = {}
    for name in list(weights):
        w = weights.pop(name)
        axis = axis_of(name)
        if axis is not None:
            axis %= w.ndim
            index = [slice(None)] * w.ndim
            index[axis] = _part(w.shape[axis], rank, size, name)
            w = mx.contiguous(w[tuple(index)])
            mx.eval(w)
        out[name] = w
    return out


def sharded_transformer_weights(
    source, world: World, modulation: bool = True, loras: Sequence = ()
) -> tuple[dict, dict[str, mx.array], bool]:
    """(config, this rank's slices of the transformer weights, whether ``loras`` were fused)
    of a ``loading.ModelSource``, for ``QwenImageTransformer.from_weights(..., group=...)``.

    A converted checkpoint is read slice by slice from disk (``read_sharded``); a diffusers
    folder (converted as it loads) or weights the LoRAs are fused into are sliced in memory one
    tensor at a time. ``modulation=False`` (adaLN cache) never reads the modulation weights.
    LoRAs on a quantized checkpoint (they would sit beside the sharded layers) are refused.
    """
    from qwen_mlx.lora import fuse_weights
    from qwen_mlx.models.transformer import MODULATION_WEIGHTS
    from qwen_mlx.precision import PrecisionPlan

    folder = source.folder("transformer")
    config = source.config("transformer")
    check_tensor_parallel(config, world.size)
    keep = None if modulation else (lambda k: not MODULATION_WEIGHTS.match(k))
    if loras and "quantization" in config:
        raise ValueError(
            "--parallel tensor fuses LoRAs into float weights: use a float checkpoint (and "
            "--quantize) with LoRAs"
        )
    if source.converted and not loras:
        return config, read_sharded(folder, world.rank, world.size, keep=keep), False
    config, weights = source.component("transformer")
    if loras:
        stored = PrecisionPlan.from_config(config, int(config.get("num_layers", 60)))
        weights = fuse_weights(weights, list(loras), stored)
    if keep is not None:
        weights = {k: v for k, v in weights.items() if keep(k)}
    return config, shard_weights(weights, world.rank, world.size), bool(loras)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every array the model holds (its weights as resident in this process)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ----------------------------------------------------------------------------- local jobs


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    import socket

    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class LocalJob:
    """What ``run_local`` saw: each rank's exit code and output, and the wall time."""

    returncodes: list[int]
    stdout: list[str]
    stderr: list[str]
    seconds: float
    timed_out: bool


def run_local(
    n: int,
    argv: Sequence[str],
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> LocalJob:
    """Run ``argv`` as an ``n``-process ring job on this machine over loopback (what
    ``mlx.launch --backend ring -n N`` does, but on free ports and keeping every rank's exit
    code). Every process is killed after ``timeout`` seconds. For tests and benchmarks."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        base = {**os.environ, **(env or {})}
        if n > 1:  # one process is a group of one: no hostfile (as mlx.launch does)
            base["MLX_HOSTFILE"] = str(hostfile)
        outs = [open(Path(tmp) / f"{r}.{k}", "w+") for r in range(n) for k in ("out", "err")]
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                list(argv),
                env={**base, "MLX_RANK": str(r)} if n > 1 else base,
                stdout=outs[2 * r],
                stderr=outs[2 * r + 1],
                cwd=cwd,
            )
            for r in range(n)
        ]
        timed_out = False
        for p in procs:
            left = max(0.0, timeout - (time.monotonic() - start))
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        seconds = time.monotonic() - start
        texts = []
        for f in outs:
            f.seek(0)
            texts.append(f.read())
            f.close()
    return LocalJob([p.returncode for p in procs], texts[0::2], texts[1::2], seconds, timed_out)


# ----------------------------------------------------------------------------- generation


def memory_fits(pipe, req) -> bool:
    """Whether one process's memory plan for ``req`` fits this machine (no advice priced)."""
    from qwen_mlx.memory import machine_memory

    return pipe.memory_estimate(req).peak <= machine_memory()[0]


def job_mode(pipe, req, size: int, fits: bool | None = None) -> str | None:
    """The mode a job of ``size`` processes runs ``req`` in (``choose_mode`` with the
    pipeline's ``parallel``); ``fits``: whether one process's plan fits (computed when None
    and ``auto`` needs it)."""
    if fits is None:
        fits = pipe.parallel != "auto" or memory_fits(pipe, req)
    return choose_mode(
        pipe.parallel,
        size,
        fits=fits,
        true_cfg=req.cfg_on,
        seeds=len(req.seeds),
        config=pipe.transformer_config(),
        serving=pipe.serving,
    )


def check_job_memory(pipe, req, mode: str | None, size: int) -> None:
    """Each process's memory plan for ``req`` in ``mode`` (a tensor split holds 1/N of the
    split weights; a cfg split half the denoising batch): ``MemoryLimitError`` with what
    would fit, or with ``pipe.memory_guard`` off (``--ignore-memory-limit``) a warning."""
    from qwen_mlx.memory import MemoryLimitError

    try:
        pipe.check_memory(req, split=mode, processes=size)
    except MemoryLimitError as e:
        if pipe.memory_guard:
            raise
        if pipe.world is None or pipe.world.is_main:
            print(ignored_memory_limit(e), file=sys.stderr)


def prepare_request(pipe, request, world: World):
    """``pipe.prepare(request)`` on every rank, as one: a rank that fails fails them all (its
    input files may differ from rank 0's), the seeds are rank 0's (it drew any random one),
    and the prepared requests must be identical."""
    with world.agree("checking the request"):
        req = pipe.prepare(request)
    seeds = world.broadcast_json(list(req.seeds), "sharing the seeds")
    req = req.replace(seeds=tuple(seeds))
    world.check_same(json.dumps(req.metadata(), sort_keys=True, default=str), "request")
    return req


def run_generate(pipe, request, cancel=None):
    """``pipe.generate`` under ``mlx.launch``: the request checked as one, the mode chosen
    (``choose_mode``), the transformer sharded under tensor, then ``generate``. Each event
    (a step, or what comes before the first) is guarded by the timeout."""
    world = pipe.world
    req = prepare_request(pipe, request, world)
    with world.agree("checking memory"):
        fits = pipe.parallel != "auto" or memory_fits(pipe, req)
    # every rank's answer counts (Macs differ): one that does not fit makes it tensor for all
    short = world.all_max(mx.array([int(not fits)], dtype=mx.int32), "checking memory")
    fits = not int(np.array(short)[0])
    with world.agree("choosing the parallel mode"):
        mode = job_mode(pipe, req, world.size, fits)
        check_job_memory(pipe, req, mode, world.size)  # on each rank, against its memory
    components = pipe.components
    want = world if mode == "tensor" else None
    if components.tensor_world is not want:
        components.free("transformer")
        components.tensor_world = want
    pipe.parallel_mode = mode
    if cancel is not None and not isinstance(cancel, SharedCancel):
        cancel = SharedCancel(world, cancel)  # a script's token: every rank passes one
    events = iter(generate(pipe, req, cancel, world, mode))
    while True:
        with world.watchdog.guard("a denoising step"):
            try:
                event = next(events)
            except StopIteration:
                return
        if world.is_main:
            yield event


def generate(pipe, request, cancel, world: World, mode: str):
    """``pipe.generate`` as one job over ``world`` in ``mode`` (cfg, seeds or tensor; the
    pipeline already holds its sharded transformer under tensor). Every rank runs this
    generator; each yields its own ``StepEvent``s, and rank 0 every image of the job, in seed
    order (``run_generate`` passes rank 0's events on).

    seeds: rank r samples seeds r, r + N, ...; cfg: pair p = r // 2 samples seeds p, p + N/2,
    ... A pair (cfg) left without a seed in the last round samples a filler and drops it, to
    keep every step's all_gather in step; so does a rank under seeds when a ``SharedCancel``
    checks every step (a server). It would only have waited for the others. After each round
    the images meet on every rank (one all_gather) and rank 0 yields them.
    """
    from PIL import Image

    from qwen_mlx.request import ImageResult

    seeds = list(request.seeds)
    if mode == "tensor":
        for event in pipe.generate(request, cancel, local=True):
            if world.is_main or not isinstance(event, ImageResult):
                yield event
        return
    workers, unit = (
        (world.size, world.rank) if mode == "seeds" else (world.size // 2, world.rank // 2)
    )
    mine = split_seeds(seeds, unit, workers)
    rounds = -(-len(seeds) // workers)
    # cfg pairs exchange velocities every step, and a SharedCancel checks every step: both need
    # every rank stepping; otherwise (seeds from the CLI) a rank out of seeds just waits
    lockstep = mode == "cfg" or isinstance(cancel, SharedCancel)
    filler = lockstep and len(mine) < rounds
    if filler:
        mine.append(seeds[-1])
    owner = mode == "seeds" or world.rank % 2 == 0  # whose images rank 0 keeps
    shape = (request.height, request.width, 3)
    done = 0

    def meet(result):
        """One round's images on every rank; rank 0 gets them in seed order."""
        keep = result is not None and owner and not (filler and done == rounds - 1)
        image = np.asarray(result.image.convert("RGB"), dtype=np.uint8) if keep else None
        images = world.gather_images(image, shape)
        metas = world.gather_json(result.metadata if result else None, "gathering images")
        out = []
        for r in range(world.size):
            if images[r] is not None:
                meta = dict(metas[r])
                if mode == "cfg" and meta.get("cache"):  # each branch counted its own passes
                    for key in ("cache_full_passes", "cache_passes"):
                        meta[key] += metas[r + 1][key]
                out.append(ImageResult(meta["seed"], Image.fromarray(images[r]), meta))
        return out

    pipe.cfg_split = CfgSplit.of(world) if mode == "cfg" else None  # the Denoiser's hook
    try:
        if mine:
            sub = request.replace(seeds=tuple(mine))
            for event in pipe.generate(sub, cancel, local=True):
                if isinstance(event, ImageResult):
                    results = meet(event)
                    done += 1
                    if world.is_main:
                        yield from results
                else:
                    yield event
    finally:
        pipe.cfg_split = None
    while done < rounds:  # this rank has no seed left: join the remaining rounds empty-handed
        results = meet(None)
        done += 1
        if world.is_main:
            yield from results
