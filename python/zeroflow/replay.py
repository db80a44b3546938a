"""Trajectory logs: record every applied ZO step as (step, scalars, lr, flags) and rebuild the
weights from (base weights, log) by re-running the same fused ops (docs/distributed.md).

A ZO step is determined by the base seed, the step counter (query and mask seeds follow the
stream v1 §8 schedule), the scalars the step consumed from the closure (the losses; for
forward_grad also grad.v) and the learning rates. The recorder logs exactly those, through the
optimizer's ``step_hook``; replay rebuilds the optimizer from the log header and plays the
scalars back through its ``scalar_hook`` with a closure that computes nothing, so the same
``perturb_`` / update calls run in the same order: bit-exact on the same backend and dtype.

File format (little-endian)::

    magic  b"ZFTRAJ\\x00\\x01"
    u32 n, header (n bytes of UTF-8 JSON), u32 crc32(header)
    records: u32 n, payload (n bytes), u32 crc32(payload)
      payload[0] = kind: 1 step, 2 group options changed, 255 end
      step:    u64 step, u8 flags (1 skipped, 2 aborted, 4 lr present, 8 task present,
               16 failed in its update: not replayable),
               [u64 task], [u16 G, G x f64 lr], u16 m, m x f64 scalars
      options: UTF-8 JSON list of per-group options (non-lr)
      end:     u64 steps recorded, u64 next step, 32 bytes sha256 of the optimized parameters

A q=1 two_side step with unchanged lr is 36 bytes (+16 per extra query).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import struct
import sys
import time
import warnings
import weakref
import zlib
from typing import Sequence

import torch

from ._atomic import atomic_torch_save
from .continual.errors import refuse_empty_path
from .optim.zo import STATE_GLOBAL_OPTIONS, check_tensor_ids, counter

__all__ = ["TrajectoryRecorder", "replay", "replay_to_file", "read_log", "replay_main", "save_base",
           "weights_sha256", "ReplayError", "TrajectoryWriteError", "LOG_FORMAT"]

MAGIC = b"ZFTRAJ\x00\x01"
LOG_FORMAT = 1
K_STEP, K_OPTIONS, K_END = 1, 2, 255
F_SKIPPED, F_ABORTED, F_LR, F_TASK, F_FAILED = 1, 2, 4, 8, 16
F_KNOWN = F_SKIPPED | F_ABORTED | F_LR | F_TASK | F_FAILED
# The optimizer's step statuses (step_hook's info["status"]): "aborted" = stopped in a forward
# pass (the closure raised; replay stops the step where its scalars run out), "failed" = stopped
# in its update after every forward pass (a kernel refused a state buffer, ^C there): replay
# cannot know what the update had applied, so it refuses to play such a step.
_STATUS_FLAG = {"ok": 0, "skipped": F_SKIPPED, "aborted": F_ABORTED, "failed": F_FAILED}
# What a recorder watches between steps beside the layout: the seed and the optimizer-wide
# options a saved state must agree on (zeroflow.optim.zo.STATE_GLOBAL_OPTIONS), which decide
# a step's seeds and the scalars it consumes.
_GLOBALS = ("seed",) + STATE_GLOBAL_OPTIONS


class ReplayError(ValueError):
    """The log cannot be replayed (corrupt, truncated, other stream version, wrong base...)."""


class TrajectoryWriteError(OSError):
    """Writing a trajectory log failed (disk full, ...) while recording: the recorder has
    stopped and left the log without an end record. ``errno`` / ``strerror`` are the failed
    write's; ``str()`` says what happened to the step and the log."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), cause.filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def weights_sha256(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in order."""
    h = hashlib.sha256()
    for n, t in zip(names, tensors):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_base(path: str, model: torch.nn.Module, optimizer=None, *, overwrite: bool = False) -> None:
    """Write the BASE checkpoint for a log atomically: ``{"model": state_dict}`` (plus the
    optimizer's state_dict when recording starts with non-empty optimizer state).

    ``overwrite``: an existing file at ``path`` is refused (FileExistsError, left as it was)
    unless True, as :class:`TrajectoryRecorder` refuses an existing log: a script run again
    replaced the BASE of its finished log, whose recorder then refused to start, and the old
    log no longer replayed ("BASE is not the checkpoint the log starts from")."""
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"save_base: {path} exists (the BASE of another log, or of this one); it is left as it "
                              "was. Give another path, remove the file, or pass overwrite=True")
    obj = {"model": model.state_dict()}
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    atomic_torch_save(obj, path)


# ---------------------------------------------------------------------------- recording
def _unwrap(optimizer):
    """The ZO optimizer inside ``optimizer`` (itself, a DataParallelZO's, a HybridFOZO's in its
    ZO phase); TypeError for anything else (zeroflow.distributed._zo_of)."""
    from zeroflow.distributed import DataParallelZO, _zo_of

    if isinstance(optimizer, DataParallelZO):
        optimizer = optimizer.optimizer
    zo, hybrid = _zo_of(optimizer)
    if hybrid is not None and not hybrid.zeroth_order:
        raise ValueError(
            "HybridFOZO is in its first-order phase: an FO step is a full gradient and cannot be replayed "
            "from scalars. Start recording at the switch (when hybrid.zeroth_order is True), with the weights "
            "saved then (zeroflow.replay.save_base) as BASE.")
    if hybrid is not None:
        # a group popped from the hybrid leaves its ZO optimizer at the hybrid's next step: the
        # header listed it (a model without it refused, one with it had the log's first step
        # refused as a change of the groups)
        hybrid._match_groups()
    return zo


class TrajectoryRecorder:
    """Record every step of a ZO optimizer (``ZOFusedSGD`` / ``ZOFusedAdam``, a
    ``HybridFOZO`` in its ZO phase, or a ``DataParallelZO``) to ``path``.

    ``model``: names the parameters (``model.named_parameters()``) so that replay can find
    them in the BASE state_dict; alternatively ``names`` in optimizer order. Save BASE (the
    weights at the moment recording starts) with :func:`save_base`; if the optimizer already
    has state (momentum, Adam moments) pass it to ``save_base`` too. ``close()`` (or the
    context manager) writes the end record with the checksum of the final weights; a log
    without it is refused as truncated. Data-parallel: record on rank 0 only (every rank
    consumes identical scalars).

    A parameter shared under several names (tied weights: ``model.named_parameters()`` with
    duplicates) is logged under its first name and its other names are kept in the header, so
    that replay writes the trained value under every name.

    A log covers one parameter layout: a step after ``add_param_group`` (or any other change of
    the groups' parameters, watched by identity) is refused before it runs with a
    RuntimeError, and the log is closed at the previous step (valid, it replays to the weights
    before the refused step). Close the recorder and start a new log after adding the group
    (``save_base(path, model, optimizer)`` + a new recorder), e.g. one log per task. So is a
    step after the optimizer's step counter was moved (``load_state_dict`` of an earlier
    state: a rollback) or after an optimizer-wide option (seed, q, estimator, conserve,
    sparse_resample) changed: the log could not replay it.

    ``overwrite``: an existing file at ``path`` is refused (FileExistsError, before anything
    is written) unless True: a second recorder on a finished log's name would otherwise
    empty it."""

    def __init__(self, path: str, optimizer, *, model: torch.nn.Module | None = None,
                 names: Sequence[str] | None = None, flush_every: int = 100, overwrite: bool = False):
        from zfkernels.stream import STREAM_VERSION

        from zeroflow.distributed import group_options, param_layout, zo_options

        # checked before the weights are hashed (int('x') said 'invalid literal', after that)
        flush_every = max(1, counter(flush_every, "flush_every"))
        opt = _unwrap(optimizer)
        if opt.estimator == "forward_grad":
            raise ValueError("estimator='forward_grad' is not supported by the trajectory log (replay would need the "
                             "model to run the jvps)")
        if opt.step_hook is not None:
            raise RuntimeError("this optimizer already has a step hook (another recorder?)")
        params = [p for g in opt.param_groups for p in g["params"]]
        aliases = {}
        if names is None:
            if model is None:
                names = [f"param{k}" for k in range(len(params))]
            else:
                by_id: dict[int, list[str]] = {}
                for n, p in model.named_parameters(remove_duplicate=False):
                    by_id.setdefault(id(p), []).append(n)
                missing = [k for k, p in enumerate(params) if id(p) not in by_id]
                if missing:
                    raise ValueError(f"optimized parameters {missing} are not parameters of model=")
                names = [by_id[id(p)][0] for p in params]
                # tied weights: the other names of a parameter hold the same tensor in the state_dict
                aliases = {by_id[id(p)][0]: by_id[id(p)][1:] for p in params if len(by_id[id(p)]) > 1}
        names = list(names)
        if len(names) != len(params) or len(set(names)) != len(names):
            raise ValueError("names= must give one distinct name per optimized parameter, in optimizer order")
        self.opt, self.names, self._params = opt, names, params
        fresh = all(len(opt.state[p]) == 0 for p in params)
        k = 0
        groups = []
        for g in opt.param_groups:
            n = len(g["params"])
            groups.append({"names": names[k:k + n], **param_layout(g["params"]),
                           "options": group_options(g, with_lr=False), "lr": float(g["lr"])})
            k += n
        self.header = {
            "format": LOG_FORMAT, "stream": STREAM_VERSION, "optimizer": type(opt).__name__, "seed": opt.seed,
            **zo_options(opt),
            "start_step": opt.step_count, "start_task": opt._task, "fresh_state": fresh,
            # the stream's ids of the parameters, which pick their z: the positions, unless a group
            # was dropped before (its ids are not given again), and BASE may hold no state to bring them
            "tensor_ids": [opt._tid[id(p)] for p in params], "next_tensor_id": opt._next_tid,
            "groups": groups, "aliases": aliases, "base_sha256": weights_sha256(names, params),
            "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:        # encoded before the file is opened: an option that is not JSON leaves any file as it was
            hdr = json.dumps(self.header, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrajectoryRecorder: the optimizer's options cannot be logged as JSON ({e}); remove "
                             "or convert the param-group entry that holds it") from None
        self._lrs = [g["lr"] for g in groups]
        self._opts = [g["options"] for g in groups]
        self._task = opt._task
        self._found = None          # _found_by_step as the running step started (_before_step)
        self._layout = self._layout_of(opt)
        self._globals = self._globals_of(opt)
        self._next_step = opt.step_count
        self._warned_failed = False
        self._steps = 0
        self._flush_every = flush_every
        self.bytes_written = 0
        try:
            self._f = open(path, "wb" if overwrite else "xb")
        except FileExistsError:
            raise FileExistsError(
                f"TrajectoryRecorder: {path} exists (a log of another run, or of this one); it is left as it was. "
                "Give another path, remove the file, or pass overwrite=True") from None
        self.path = path
        self._pre_hook = None
        try:    # the header on disk now: a process killed before the first flush leaves a log, not an empty file
            self._write(MAGIC + struct.pack("<I", len(hdr)) + hdr + struct.pack("<I", zlib.crc32(hdr)))
            self._f.flush()
        except OSError:
            self._f.close()
            os.unlink(path)
            raise
        opt.step_hook = self._on_step
        # checked before every step, so that a step on another layout never runs while recording
        self._pre_hook = opt.register_step_pre_hook(self._before_step)
        # A recorder never closed: the optimizer and it hold each other (the hooks, self.opt), so
        # only the cycle collector frees them, and it finalized the raw file before its buffer:
        # the last (up to flush_every - 1) records never reached the disk. The finalizer holds
        # the file, outside that cycle, and flushes it first (also at interpreter exit).
        weakref.finalize(self, _flush_unclosed, self._f, path)

    @staticmethod
    def _layout_of(opt) -> list:
        """What the log's header fixes: the groups and, in each, the parameter objects. By
        identity only: reading every shape and dtype cost ~65 us a step on 150 parameters (this
        CPU), ids ~6 us; a tensor swapped under a parameter (``p.data = ...``) is not watched
        (the kernels refuse another dtype; another shape fails the log's end checksum)."""
        return [tuple(map(id, g["params"])) for g in opt.param_groups]

    def _layout_change(self, opt) -> str | None:
        """How the optimizer's parameters differ from those the log started with, or None."""
        now = self._layout_of(opt)
        if now == self._layout:
            return None
        sizes, was = [len(g) for g in now], [len(g) for g in self._layout]
        if sizes != was:
            return (f"the log started with {len(was)} param group(s) of {was} parameters, the optimizer now has "
                    f"{len(sizes)} of {sizes}")
        return "the optimized parameters are not those the log started with"

    @staticmethod
    def _globals_of(opt) -> tuple:
        """The optimizer-wide values the log's header fixes (a step's seeds and scalar count
        follow from them), in the order of ``_GLOBALS``; ~1 us a step."""
        return tuple(getattr(opt, k) for k in _GLOBALS)

    @staticmethod
    def _found_by_step(opt) -> tuple:
        """What a step takes from the groups and the optimizer beside the layout and the
        globals: each group's lr (as the step converts it: checked by the step) and other
        options, and the mask epoch."""
        from zeroflow.distributed import _jsonable, group_options

        return ([_jsonable(g["lr"]) for g in opt.param_groups],
                [group_options(g, with_lr=False) for g in opt.param_groups], opt._task)

    def _before_step(self, opt, args, kwargs) -> None:
        if opt._step_token is not None:     # called from a running step's closure: it refuses itself
            return
        change = self._layout_change(opt)
        if change is not None:
            self._refuse(opt, "the optimizer's parameters changed while recording (add_param_group?): " + change
                         + ". A trajectory log covers one parameter layout", "after adding the group")
        if opt.step_count != self._next_step:
            self._refuse(opt, f"the optimizer's step counter is {opt.step_count}, the log's next step is "
                         f"{self._next_step} (load_state_dict of another state: a rollback?). A trajectory log holds "
                         "consecutive steps. Its end checksum is of the weights now: if they were rolled back too, "
                         "replay it with verify=False (zeroflow replay --no-verify) for the weights after step "
                         f"{self._next_step - 1}", "from the state loaded")
        now = self._globals_of(opt)
        if now != self._globals:
            diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in zip(_GLOBALS, self._globals, now) if a != b)
            self._refuse(opt, f"optimizer-wide options changed while recording ({diff}); a log replays with the "
                         "options of its header", "after changing them")
        # read as the step starts: a closure that sets an lr or an option, or starts a new mask
        # epoch, changes the next step, not this one (docs/algorithms.md §7), and after the step
        # the groups hold the new values
        found = self._found_by_step(opt)
        if found[1] != self._opts:
            self._check_loggable(opt, found[1])
        self._found = found

    def _check_loggable(self, opt, opts: list) -> None:
        """Refuse a step whose group options cannot be written as JSON (a set, an object):
        the options record, written after the step, raised from the step hook once the update
        was applied, and the log then lacked that step (replay refused it as inconsistent).
        Before the step nothing has changed, and the recording goes on once the option is fixed."""
        try:
            json.dumps(opts, sort_keys=True)
            return
        except (TypeError, ValueError) as e:
            err = e
        bad = None
        for i, o in enumerate(opts):
            for k, v in o.items():
                try:
                    json.dumps(v, sort_keys=True)
                except (TypeError, ValueError):
                    bad = bad or (i, k, v)
        where = (f"param group {bad[0]}'s option {bad[1]!r} = {bad[2]!r} ({type(bad[2]).__name__})" if bad
                 else "the param groups' options")
        raise ValueError(
            f"TrajectoryRecorder: step {opt.step_count} refused: {where} cannot be logged as JSON ({err}). The step "
            f"did not run and {self.path} stays as it was, recording: set the option to a JSON value (a number, "
            "string, bool, None, or a list or dict of them) or remove it, then step again") from None

    def _guarded(self, what: str, io, *args):
        """``io(*args)``, a write or flush of the log; a failure stops the recording (no end
        record: a checksum of weights the log does not reach would refuse it as another run's)."""
        try:
            return io(*args)
        except OSError as e:
            self._detach()
            f, self._f = self._f, None
            with contextlib.suppress(OSError):
                f.close()       # flushes what it can: the complete records replay with allow_truncated
            raise TrajectoryWriteError(
                f"TrajectoryRecorder: writing {self.path} failed ({e.strerror or e}) {what}. Recording stopped: the "
                "log has no end record; replay(..., allow_truncated=True) or zeroflow replay --allow-truncated "
                "replays the steps it holds, unverified", e) from e

    def _refuse(self, opt, what: str, when: str):
        n = opt.step_count
        self.close()        # the end record: the weights now (this step has not run)
        raise RuntimeError(
            f"TrajectoryRecorder: step {n} refused: {what}. The step did not run and {self.path} was closed with "
            f"the steps recorded so far. Close the recorder before the next step and start a new log {when}: "
            "save_base(path, model, optimizer) and a new TrajectoryRecorder (e.g. one log per task).")

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self.bytes_written += len(b)

    def _flush(self, what: str, sync: bool = False) -> None:
        self._guarded(what, self._f.flush)
        if sync:
            self._guarded(what, os.fsync, self._f.fileno())

    def _record(self, payload: bytes) -> None:
        self._write(struct.pack("<I", len(payload)) + payload + struct.pack("<I", zlib.crc32(payload)))

    def _on_step(self, opt, info: dict) -> None:
        if [len(g["params"]) for g in opt.param_groups] != [len(g) for g in self._layout]:
            # changed during the step (_before_step saw the old layout: the closure added a group):
            # the step ran and cannot be logged, and the weights after the step before it are gone,
            # so no end record can be written; the log is left without one (refused as truncated)
            self.abandon()
            raise RuntimeError(
                f"TrajectoryRecorder: the optimizer's param groups changed during step {info['step']} "
                f"(add_param_group in the closure?): {self._layout_change(opt)}. The step ran (or failed) on "
                f"parameters the log does not hold, so {self.path} cannot be completed (it has no end record and "
                "replay refuses it). Add groups between steps, after closing the recorder, and start a new log then.")
        found, self._found = self._found, None
        found_lrs, opts, task = found if found is not None else self._found_by_step(opt)
        if opts != self._opts:
            self._guarded(f"at step {info['step']}, which ran (its update is applied; the log does not hold it)",
                          self._record, bytes([K_OPTIONS]) + json.dumps(opts, sort_keys=True).encode())
            self._opts = opts
        flags = _STATUS_FLAG[info["status"]]
        lrs = [float(lr) for lr in found_lrs]
        extra = b""
        if task != self._task:
            flags |= F_TASK
            extra += struct.pack("<Q", task)
            self._task = task
        if lrs != self._lrs:
            flags |= F_LR
            extra += struct.pack(f"<H{len(lrs)}d", len(lrs), *lrs)
            self._lrs = lrs
        sc = info["scalars"]
        what = (f"at step {info['step']}, which ran (its update is applied; the log does not hold it), "
                f"status {info['status']!r}")
        self._guarded(what, self._record, struct.pack("<BQB", K_STEP, info["step"], flags) + extra
                      + struct.pack(f"<H{len(sc)}d", len(sc), *sc))
        self._steps += 1
        self._next_step = opt.step_count
        if flags & F_FAILED and not self._warned_failed:
            self._warned_failed = True
            warnings.warn(
                f"TrajectoryRecorder: step {info['step']} failed in its update; {self.path} cannot be replayed "
                f"past step {info['step'] - 1}. To keep a replayable trajectory, close this recorder and start "
                "a new log from a checkpoint saved now (save_base(path, model, optimizer)).",
                RuntimeWarning, stacklevel=2)
        if self._steps % self._flush_every == 0:
            self._flush(what)

    def _detach(self) -> None:
        if self.opt.step_hook == self._on_step:
            self.opt.step_hook = None
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def abandon(self) -> None:
        """Stop recording without an end record (what was written stays on disk): for a
        recording cut short (an error, a ^C), whose weights are not where the trajectory was
        meant to end. Replay refuses the log as truncated unless allow_truncated (its steps,
        unverified); ``close()`` would make it look whole. No-op once closed."""
        if self._f is None:
            return
        self._detach()
        self._flush("while stopping", sync=True)
        self._f.close()
        self._f = None

    def close(self) -> None:
        if self._f is None:
            return
        self._detach()
        digest = bytes.fromhex(weights_sha256(self.names, self._params))
        # the next step the log holds, not opt.step_count: a rollback moved that back (_before_step)
        self._guarded("in its end record", self._record, struct.pack("<BQQ", K_END, self._steps, self._next_step)
                      + digest)
        self._flush("in its end record", sync=True)
        self._f.close()
        self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _flush_unclosed(f, path: str) -> None:
    """What becomes of a recorder dropped without close() or abandon(): its records flushed
    and the log closed without an end record, as abandon() leaves it, and a warning."""
    if f.closed:
        return
    try:
        f.flush()
    finally:
        f.close()
    warnings.warn(f"TrajectoryRecorder: {path} was not closed; the steps it recorded are on disk, without an end "
                  "record (replay it with allow_truncated=True, unverified). Close the recorder (or use it as a "
                  "context manager) to end the log with the checksum of the weights", RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------- reading
def read_log(path: str, *, allow_truncated: bool = False) -> tuple[dict, list[tuple]]:
    """Parse and validate a whole log: ``(header, records)``; records are
    ``("step", step, flags, task|None, lrs|None, scalars)``, ``("options", list)`` and a final
    ``("end", n_steps, next_step, sha256_hex)``. Raises :class:`ReplayError` on a bad magic,
    a checksum or length mismatch, a missing end record (truncated) or data after it.

    ``allow_truncated``: a log whose recorder never closed (the process was killed) ends
    without an end record, possibly inside a record written in part: its complete records
    are returned, without an end record (the last one is "end" only for a complete log). A
    checksum mismatch is still refused: a crash cuts a file, it does not change its bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:        # "[Errno 2] No such file or directory: 'x'": which input?
        raise ReplayError(f"cannot read LOG {path}: {e.strerror or e}") from None
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise ReplayError(f"{path}: truncated log ({len(data)} bytes: the recording process stopped before its "
                          "header was written); nothing to replay")
    if data[:6] != MAGIC[:6]:
        raise ReplayError(f"{path}: not a zeroflow trajectory log (bad magic)")
    if data[:8] != MAGIC:
        raise ReplayError(f"{path}: trajectory log format {data[6:8].hex()} is not supported (this reads format "
                          f"{LOG_FORMAT})")
    pos = 8

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ReplayError(f"{path}: truncated log ({what} at byte {pos} needs {n} bytes, file has "
                              f"{len(data) - pos} left)")
        b = data[pos:pos + n]
        pos += n
        return b

    (hn,) = struct.unpack("<I", take(4, "header length"))
    hdr = take(hn, "header")
    (crc,) = struct.unpack("<I", take(4, "header checksum"))
    if zlib.crc32(hdr) != crc:
        raise ReplayError(f"{path}: corrupt log (header checksum mismatch)")
    try:
        header = json.loads(hdr.decode())
    except ValueError as e:         # bad UTF-8 or JSON behind a valid crc: another writer
        raise ReplayError(f"{path}: corrupt log (the header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ReplayError(f"{path}: corrupt log (the header is not a JSON object)")
    records: list[tuple] = []
    while True:
        if pos == len(data):
            if allow_truncated:
                return header, records
            raise ReplayError(f"{path}: truncated log: no end record after {len(records)} records (the recorder was "
                              "not closed, or the file was cut; replay(..., allow_truncated=True) or zeroflow replay "
                              "--allow-truncated replays its complete records, unverified)")
        try:
            (n,) = struct.unpack("<I", take(4, "record length"))
            payload = take(n, f"record {len(records)}")
            (crc,) = struct.unpack("<I", take(4, "record checksum"))
        except ReplayError as e:
            if allow_truncated:         # the record the process was writing when it stopped
                return header, records
            raise ReplayError(f"{e}; replay(..., allow_truncated=True) or zeroflow replay --allow-truncated replays "
                              "its complete records, unverified") from None
        if zlib.crc32(payload) != crc:
            raise ReplayError(f"{path}: corrupt log (checksum mismatch in record {len(records)} at byte {pos - n - 8})")
        try:
            if not payload:         # its crc32 is 0: zeros where records should be match it
                raise ReplayError("empty")
            kind = payload[0]
            if kind == K_STEP:
                step, flags = struct.unpack_from("<QB", payload, 1)
                if flags & ~F_KNOWN:
                    raise ReplayError(f"unknown flags {flags:#x}")
                off = 10
                task = lrs = None
                if flags & F_TASK:
                    (task,) = struct.unpack_from("<Q", payload, off)
                    off += 8
                if flags & F_LR:
                    (g,) = struct.unpack_from("<H", payload, off)
                    lrs = list(struct.unpack_from(f"<{g}d", payload, off + 2))
                    off += 2 + 8 * g
                (m,) = struct.unpack_from("<H", payload, off)
                sc = list(struct.unpack_from(f"<{m}d", payload, off + 2))
                if off + 2 + 8 * m != len(payload):
                    raise ReplayError("length")
                records.append(("step", step, flags, task, lrs, sc))
            elif kind == K_OPTIONS:
                opts = json.loads(payload[1:].decode())
                if not (isinstance(opts, list) and all(isinstance(o, dict) for o in opts)):
                    raise ReplayError("options are not a list of objects")
                records.append(("options", opts))
            elif kind == K_END:
                nsteps, nxt = struct.unpack_from("<QQ", payload, 1)
                if len(payload) != 17 + 32:
                    raise ReplayError("length")
                records.append(("end", nsteps, nxt, payload[17:].hex()))
                break
            else:
                raise ReplayError(f"unknown record kind {kind}")
        except (struct.error, ReplayError, ValueError) as e:
            raise ReplayError(f"{path}: corrupt log (record {len(records)} malformed: {e})") from None
    if pos != len(data):
        raise ReplayError(f"{path}: corrupt log ({len(data) - pos} bytes after the end record)")
    nsteps = sum(1 for r in records if r[0] == "step")
    if records[-1][1] != nsteps:
        raise ReplayError(f"{path}: corrupt log (end record says {records[-1][1]} steps, found {nsteps})")
    return header, records


# ---------------------------------------------------------------------------- replay
class _Abort(Exception):
    pass


def _load_base(base):
    if isinstance(base, (str, os.PathLike)):
        try:
            base = torch.load(base, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ReplayError(f"cannot read BASE {base!s}: {e}") from None
    if not isinstance(base, dict):
        raise ReplayError("BASE must be a state_dict (name -> tensor) or {'model': state_dict, 'optimizer': ...}")
    if "model" in base and isinstance(base["model"], dict):
        return dict(base["model"]), base.get("optimizer")
    return dict(base), None


def replay(base, log: str, *, backend: str | None = None, device: str | torch.device = "cpu",
           verify: bool = True, allow_truncated: bool = False) -> dict:
    """Rebuild the weights at the end of ``log`` from ``base`` (a path or a state_dict, as
    written by :func:`save_base` or a plain ``model.state_dict()``).

    Returns the BASE state_dict with the optimized tensors replaced by their final values.
    ``backend``/``device``: any zfkernels backend on any device (default ``"auto"`` for
    ``device``): every backend computes the same bits (docs/kernel-ops.md, "Arithmetic"), so a
    log recorded on a GPU replays bit-exactly on a laptop. ``verify``: compare the result with
    the checksum in the end record (raise :class:`ReplayError` on mismatch), whatever the
    backend. ``allow_truncated``: a log without an end record (its recording process was
    killed) replays up to its last complete step record, with a RuntimeWarning: there is no
    final checksum to check the result against (:func:`read_log`)."""
    return _replay_records(base, *read_log(log, allow_truncated=allow_truncated), backend=backend, device=device,
                           verify=verify)


def _replay_target(backend: str | None, device, names: tuple[str, str] = ("backend=", "device=")) -> torch.device:
    """``device`` as a torch.device that replay can run on, and ``backend`` (None: auto) able
    to run there; a ReplayError naming the argument (``names``: how the caller spells them)
    otherwise. A bad backend was reported as "the log's options are refused", a bad device in
    torch's words ("Expected one of cpu, cuda, ipu, ..."), a meta one as "Cannot copy out of
    meta tensor" after BASE was read."""
    import zfkernels

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ReplayError(f"{names[1]}{device!r} is not a device ({e}); replay runs on cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ReplayError(f"{names[1]}{device!r}: replay runs on cpu or cuda devices (every backend replays the same "
                          "bits, so cpu always does)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReplayError(f"{names[1]}{device!r}: CUDA is not available here; replay on cpu (every backend replays "
                          "the same bits)")
    if backend is not None:
        try:
            zfkernels.resolve_backend(backend, dev)
        except (ValueError, RuntimeError) as e:
            # zfkernels advises the Python API's spelling (use backend='auto'), which `zeroflow
            # replay` does not take: its user types the flag
            why = str(e).replace("; use backend='auto'", "")
            fix = ("" if backend not in zfkernels.BACKENDS else
                   "; use --backend auto, or leave --backend out" if names[0].startswith("--") else
                   "; use backend='auto' or None")
            raise ReplayError(f"{names[0]}{backend!r} cannot replay on {dev}: {why}{fix} (every backend replays the "
                              f"same bits)") from None
    return dev


def _options_from_log(o: dict) -> dict:
    """A param group's options as logged (JSON) back to optimizer values (betas: a tuple)."""
    o = dict(o)
    if "betas" in o:
        o["betas"] = tuple(o["betas"])
    return o


def _replay_records(base, header: dict, records: list, *, backend: str | None, device, verify: bool) -> dict:
    """:func:`replay` on a log already parsed by :func:`read_log`: check the header, take the
    optimized tensors from BASE, rebuild the optimizer, play the records, verify the result."""
    import zfkernels

    cls = _optimizer_class(header)
    _check_header(header)
    device = _replay_target(backend, device)
    sd, opt_sd = _load_base(base)
    groups, names, tensors = _base_params(sd, header, device)
    rec_backends = sorted(set(header["resolved_backend"].values()))
    opt = _rebuilt_optimizer(cls, header, groups, opt_sd, backend or "auto")
    used = zfkernels.resolve_backend(opt.backend, device)
    _play(opt, records)
    final = weights_sha256(names, tensors)
    if not records or records[-1][0] != "end":      # read_log(allow_truncated=True) of a cut log
        steps = [r[1] for r in records if r[0] == "step"]
        warnings.warn(f"the log has no end record (its recording process stopped without closing it): replayed its "
                      f"{len(steps)} complete step records"
                      + (f", up to step {steps[-1]}" if steps else "")
                      + "; there is no final checksum to check the weights against", RuntimeWarning, stacklevel=3)
    elif verify and final != records[-1][3]:
        raise ReplayError(f"replayed weights differ from the recorded final weights (checksum mismatch; replayed "
                          f"with backend {used!r} on {device}, recorded with {rec_backends}): BASE or the log does not "
                          "belong to this run (or it is a Gaussian log recorded with backend 'triton' or 'torch' "
                          "before every backend computed the same bits, 2026-11-30)")
    return _output(sd, header, names, tensors)


def _output(sd: dict, header: dict, names: list, tensors: list) -> dict:
    """BASE's state_dict with every name of each replayed tensor holding its final value: its
    logged name and its other names, the tied weights' aliases (from the header, and any BASE
    entry that is the very same tensor view as the logged one). An alias left at its BASE
    value would be loaded after the trained tensor by ``load_state_dict`` and undo training."""
    def view(t):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None
        return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    logged = set(names)
    shared: dict = {}
    for k, t in sd.items():
        v = view(t)
        if v is not None and k not in logged:
            shared.setdefault(v, []).append(k)
    aliases = header.get("aliases") or {}
    out = dict(sd)
    for n, t in zip(names, tensors):
        final = t.detach().requires_grad_(False).to(sd[n].device)
        out[n] = final
        for a in list(aliases.get(n, ())) + shared.get(view(sd[n]), []):
            if a not in sd or a in logged:
                continue
            b = sd[a]
            if not isinstance(b, torch.Tensor) or b.shape != final.shape or b.dtype != final.dtype:
                desc = f"{tuple(b.shape)} {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
                raise ReplayError(f"BASE entry {a!r} is {desc}, but the log records it as another name of {n!r} "
                                  f"({tuple(final.shape)} {final.dtype}, tied weights)")
            out[a] = final if b.device == final.device else final.to(b.device)
    return out


# What the header of a log holds, and the JSON type of each entry (format, stream and optimizer
# are checked first, by _optimizer_class).
_HEADER_KEYS = {"seed": int, "global": dict, "resolved_backend": dict, "start_step": int, "start_task": int,
                "fresh_state": bool, "groups": list, "base_sha256": str}


def _check_header(header: dict) -> None:
    """ReplayError unless the header has every entry replay reads, of the right type (a log
    from another writer, or an edited one with a recomputed crc, fails here, not in a KeyError)."""
    def bad(what: str):
        raise ReplayError(f"malformed log header ({what}): not a header written by TrajectoryRecorder")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for k, t in _HEADER_KEYS.items():
        if k not in header:
            bad(f"no {k!r}")
        v = header[k]
        if not (is_int(v) if t is int else isinstance(v, t)):
            bad(f"{k!r} is {type(v).__name__}, expected {t.__name__}")
    if not header["groups"]:
        bad("no param groups")
    for gi, g in enumerate(header["groups"]):
        if not isinstance(g, dict):
            bad(f"group {gi} is {type(g).__name__}")
        for k, t in (("names", list), ("shapes", list), ("dtypes", list), ("options", dict), ("lr", (int, float))):
            if k not in g:
                bad(f"group {gi} has no {k!r}")
            if not isinstance(g[k], t) or isinstance(g[k], bool):
                bad(f"group {gi}: {k!r} is {type(g[k]).__name__}")
        if not (len(g["names"]) == len(g["shapes"]) == len(g["dtypes"])):
            bad(f"group {gi}: {len(g['names'])} names, {len(g['shapes'])} shapes, {len(g['dtypes'])} dtypes")
        if not (all(isinstance(n, str) for n in g["names"]) and all(isinstance(d, str) for d in g["dtypes"])
                and all(isinstance(sh, list) and all(is_int(x) and x >= 0 for x in sh) for sh in g["shapes"])):
            bad(f"group {gi}: a name, shape or dtype of the wrong type")
    n = sum(len(g["names"]) for g in header["groups"])
    if "tensor_ids" in header:          # logs written before it: the ids are the positions
        try:
            check_tensor_ids(header["tensor_ids"], header.get("next_tensor_id"), n, "the header's")
        except ValueError as e:
            bad(str(e))
    aliases = header.get("aliases", {})
    if not (isinstance(aliases, dict)
            and all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in aliases.values())):
        bad("'aliases' is not an object of name lists")


def _optimizer_class(header: dict):
    """The optimizer class that recorded the log; ReplayError for another log format or
    stream version (the same seeds would regenerate other z)."""
    from zfkernels.stream import STREAM_VERSION

    from zeroflow.optim.zo import ZOFusedAdam, ZOFusedSGD

    if header.get("format") != LOG_FORMAT:
        raise ReplayError(f"log format {header.get('format')!r} is not supported (this reads {LOG_FORMAT})")
    if header.get("stream") != STREAM_VERSION:
        raise ReplayError(
            f"the log was recorded with perturbation stream {header.get('stream')!r}; this zeroflow implements "
            f"stream {STREAM_VERSION!r}, which regenerates different z from the same seeds, so the log cannot be "
            "replayed here (use the zeroflow version that wrote it)")
    cls = {"ZOFusedSGD": ZOFusedSGD, "ZOFusedAdam": ZOFusedAdam}.get(header.get("optimizer"))
    if cls is None:
        raise ReplayError(f"unknown optimizer {header.get('optimizer')!r} in the log")
    return cls


def _base_params(sd: dict, header: dict, device: torch.device):
    """The log's param groups with fresh parameters copied from BASE onto ``device``:
    ``(groups, names, tensors)``; ReplayError if BASE lacks a tensor, has another shape or
    dtype, or is not the checkpoint the log starts from."""
    groups, names, tensors = [], [], []
    for gi, g in enumerate(header["groups"]):
        ps = []
        for n, shape, dt in zip(g["names"], g["shapes"], g["dtypes"]):
            if n not in sd:
                raise ReplayError(f"BASE has no tensor {n!r} (the log optimizes {len(g['names'])} tensors of "
                                  f"group {gi})")
            t = sd[n]
            if not isinstance(t, torch.Tensor):
                raise ReplayError(f"BASE entry {n!r} is not a tensor but {type(t).__name__} (the log expects "
                                  f"{tuple(shape)} {dt})")
            if list(t.shape) != shape or str(t.dtype).replace("torch.", "") != dt:
                raise ReplayError(f"BASE tensor {n!r} is {tuple(t.shape)} {t.dtype}, the log expects "
                                  f"{tuple(shape)} {dt}")
            p = t.detach().to(device).clone().contiguous().requires_grad_(True)
            ps.append(p)
            names.append(n)
            tensors.append(p)
        groups.append({"params": ps, **_options_from_log(g["options"]), "lr": g["lr"]})
    if weights_sha256(names, tensors) != header["base_sha256"]:
        raise ReplayError("BASE is not the checkpoint the log starts from (checksum of the optimized tensors differs)")
    return groups, names, tensors


def _rebuilt_optimizer(cls, header: dict, groups: list, opt_sd, backend: str):
    """The recording optimizer as it was when the log started (options, seed, state, step
    and task counters, tensor ids), running ``backend``."""
    try:
        opt = cls(groups, seed=header["seed"], **dict(header["global"], backend=backend))
    except (TypeError, ValueError) as e:
        raise ReplayError(f"the log's options are refused by {cls.__name__}: {e}") from None
    if not header["fresh_state"]:
        if opt_sd is None:
            raise ReplayError("the log started with non-empty optimizer state; BASE must contain it "
                              "(save_base(path, model, optimizer))")
        hybrid = opt_sd.get("hybrid") if isinstance(opt_sd, dict) else None
        if isinstance(hybrid, dict) and "zo" in hybrid:
            opt_sd = hybrid["zo"]       # a HybridFOZO's (save_base of the hybrid): the log is its ZO optimizer's
        try:
            opt.load_state_dict(opt_sd)
        except (KeyError, TypeError, ValueError) as e:
            raise ReplayError(f"BASE's optimizer state cannot be loaded: {e}") from None
        # load_state_dict brought BASE's group options and seed; the log started with the
        # header's (an lr scheduler built, or an option set, after save_base changed them)
        for g, hg in zip(opt.param_groups, groups):
            g.update({k: v for k, v in hg.items() if k != "params"})
        opt._seed = int(header["seed"])
    opt._n = int(header["start_step"])
    opt._task = int(header["start_task"])
    if "tensor_ids" in header:      # checked by _check_header
        opt._restore_tensor_ids(header["tensor_ids"], header["next_tensor_id"])
    return opt


def _play(opt, records: list) -> None:
    """Run one ``opt.step`` per step record with a closure that computes nothing: the
    recorded scalars reach the step through ``scalar_hook`` (an aborted step stops where
    its scalars ran out), and the option, lr and task records are applied first. A step
    that failed in its update is not played: ReplayError."""
    queue: list[float] = []
    abort_after = [False]

    def playback(values):
        out = []
        for _ in values:
            if not queue:
                if abort_after[0]:
                    raise _Abort()
                raise ReplayError(f"log inconsistent with the optimizer: step {opt.step_count} asks for more scalars "
                                  "than were recorded")
            out.append(queue.pop(0))
        return out

    opt.scalar_hook = playback
    zero = lambda: 0.0  # noqa: E731
    played = 0
    for rec in records:
        if rec[0] == "options":
            if len(rec[1]) != len(opt.param_groups):
                raise ReplayError("log inconsistent: options record does not match the number of param groups")
            for g, o in zip(opt.param_groups, rec[1]):
                g.update(_options_from_log(o))
            continue
        if rec[0] == "end":
            if opt.step_count != rec[2]:
                raise ReplayError(f"log inconsistent: replay ended at step {opt.step_count}, the log at {rec[2]}")
            continue
        _, step, flags, task, lrs, sc = rec
        if step != opt.step_count:
            raise ReplayError(f"log inconsistent: record for step {step} where step {opt.step_count} was expected")
        if flags & F_FAILED:
            before = (f"the log is valid up to step {step - 1}" if played else
                      "it is the log's first step, so the log holds nothing replayable")
            raise ReplayError(
                f"step {step} failed in its update during the recorded run (a kernel refused a state buffer, or the "
                f"update was interrupted), which replay cannot reproduce; {before}. Record from a checkpoint saved "
                "after the failure (save_base(path, model, optimizer) and a new TrajectoryRecorder) to replay what "
                "followed")
        if task is not None:
            opt._task = int(task)
        if lrs is not None:
            if len(lrs) != len(opt.param_groups):
                raise ReplayError("log inconsistent: lr record does not match the number of param groups")
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr
        queue[:] = sc
        abort_after[0] = bool(flags & F_ABORTED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                opt.step(zero)
            except _Abort:
                pass
        if queue:
            raise ReplayError(f"log inconsistent: step {step} consumed {len(sc) - len(queue)} of {len(sc)} scalars")
        played += 1
    opt.scalar_hook = None


def _check_out(out: str, base, log: str, overwrite: bool) -> None:
    """Refuse, before replaying, an ``out`` that is BASE or LOG (always) or that exists
    (unless ``overwrite``): the weights would replace an input, or a result, without a word."""
    refuse_empty_path(out, "--out", "give the file to write the replayed weights to, e.g. --out weights.pt",
                      error=FileNotFoundError)
    if os.path.isdir(out) or str(out).endswith(("/", os.sep)):
        raise IsADirectoryError(f"the output {out} names a folder: give the file to write the replayed weights to, "
                                f"e.g. {os.path.join(out, 'weights.pt')}")
    for name, path in (("BASE", base), ("LOG", log)):
        if isinstance(path, (str, os.PathLike)) and os.path.exists(out) and os.path.exists(path) \
                and os.path.samefile(out, path):
            raise FileExistsError(f"the output {out} is {name}: the replayed weights would replace it; give another "
                                  "output path")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):       # found by the write, after the whole replay
        raise FileNotFoundError(f"the output {out} cannot be written: its folder {folder} does not exist; create it "
                                "or give another path")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"the output {out} exists and is left as it was; give another path, remove it, or "
                              "overwrite it (overwrite=True, zeroflow replay --overwrite)")


def replay_to_file(base, log: str, out: str, *, overwrite: bool = False, **kw) -> dict:
    """:func:`replay` then write the state_dict to ``out`` atomically (temporary file in
    the same directory + rename; nothing is left at ``out`` if anything fails). An existing
    ``out`` is refused before replaying unless ``overwrite`` (BASE or LOG always)."""
    _check_out(out, base, log, overwrite)
    sd = replay(base, log, **kw)
    atomic_torch_save(sd, out)
    return sd


def replay_parser() -> argparse.ArgumentParser:
    """The parser of ``zeroflow replay BASE LOG --out WEIGHTS``."""
    ap = argparse.ArgumentParser(prog="zeroflow replay",
                                 description="Rebuild trained weights from a base checkpoint and a ZO trajectory log.")
    ap.add_argument("base", metavar="BASE", help="weights the log starts from (torch.save'd state_dict, or "
                    "{'model': ..., 'optimizer': ...} from zeroflow.replay.save_base)")
    ap.add_argument("log", metavar="LOG", help="trajectory log written by zeroflow.replay.TrajectoryRecorder")
    ap.add_argument("--out", required=True, metavar="WEIGHTS", help="output state_dict (written atomically)")
    ap.add_argument("--backend", default=None, help="zfkernels backend (default: auto for --device); every backend "
                    "replays bit-exactly, whichever recorded the log")
    ap.add_argument("--device", default="cpu", help="device to replay on: cpu | cuda | cuda:N (default: cpu)")
    ap.add_argument("--no-verify", action="store_true", help="skip the final-weights checksum check")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (never BASE or LOG)")
    ap.add_argument("--allow-truncated", action="store_true", help="replay a log without an end record (its recording "
                    "process was killed) up to its last complete step, unverified")
    return ap


def replay_main(argv: list[str] | None = None) -> int:
    """``zeroflow replay BASE LOG --out WEIGHTS``."""
    a = replay_parser().parse_args(argv)
    written = False
    try:
        t0 = time.perf_counter()
        _replay_target(a.backend, a.device, ("--backend ", "--device "))
        _check_out(a.out, a.base, a.log, a.overwrite)
        header, records = read_log(a.log, allow_truncated=a.allow_truncated)   # read once: replayed, summarised
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", RuntimeWarning)
            sd = _replay_records(a.base, header, records, backend=a.backend, device=a.device, verify=not a.no_verify)
        for w in said:
            _tell(f"zeroflow replay: warning: {w.message}", sys.stderr)
        atomic_torch_save(sd, a.out)
        written = True
        n = sum(1 for r in records if r[0] == "step")
        _tell(f"zeroflow replay: {n} steps of {header['optimizer']} (stream {header['stream']}, seed "
              f"{header['seed']}) replayed in {time.perf_counter() - t0:.2f}s -> {a.out}", sys.stdout)
        return 0
    except _Closed:
        # `zeroflow replay ... | head -0`, or stderr closed too (`2>&1 | head`): the end of any
        # command whose output went away (zeroflow.cli), not a traceback at exit (exit 120)
        from .cli import _output_closed
        return _output_closed(f"zeroflow replay: stdout was closed by its reader; {a.out} was written" if written
                              else f"zeroflow replay: stopped (its output was closed by its reader); nothing was "
                                   f"written to {a.out}")
    except (ReplayError, OSError, RuntimeError, ValueError) as e:
        return _said(f"zeroflow replay: error: {e}", 2)
    except KeyboardInterrupt:       # ^C in a long replay: one line, not a traceback (--out is written atomically)
        return _said(f"zeroflow replay: interrupted; nothing was written to {a.out}", 130)


class _Closed(Exception):
    """A write of :func:`replay_main` to a stdout or stderr whose reader went away."""


def _tell(message: str, stream) -> None:
    """``message`` on ``stream``, flushed (stdout into a pipe is block-buffered: its reader gone,
    the write failed at exit only); a closed one is :class:`_Closed`."""
    try:
        print(message, file=stream, flush=True)
    except BrokenPipeError:
        raise _Closed() from None


def _said(message: str, rc: int) -> int:
    from .cli import _said as said
    return said(message, rc)


# python -m zeroflow.replay BASE LOG --out WEIGHTS (= zeroflow replay ...): without this the
# module ran nothing and exited 0, which read as a replay written
if __name__ == "__main__":
    sys.exit(replay_main())
