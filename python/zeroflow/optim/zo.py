"""ZOFusedSGD / ZOFusedAdam: drop-in forward-pass-only optimizers on the fused kernels.

The optimizer only orchestrates: it derives the seeds (stream v1 §8), runs the closure
(forward passes), turns losses into projected-gradient scalars, keeps the state and the
counters, and calls the fused ops of ``zfkernels`` (``perturb_``, ``zo_sgd_update_``,
``zo_adam_update_``). It never materializes z or a gradient (Forward-Grad excepted: its
jvp needs the tangent tensors). The exact formulas, pass counts and the differences from
the public reference code are in docs/algorithms.md.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import re
import sys
import threading
import warnings
from typing import Callable

import torch

import zfkernels

try:
    import _signal as _sig      # the C module under `signal`: no enum conversion per call (see _InterruptGate)
except ImportError:             # pragma: no cover - other Python implementations
    import signal as _sig
from zfkernels import derive_seed
from zfkernels._overlap import overlapping_pair
from zfkernels.stream import (
    QUERY_MASK_PER_STEP,
    QUERY_MASK_PER_TASK,
    QUERY_ROUNDING,
    SEED_LIMIT,
    STREAM_VERSION,
    TENSOR_ID_LIMIT,
    _is_bool,
    dist_code,
    mask_threshold,
)

__all__ = ["ZOFusedSGD", "ZOFusedAdam"]

ESTIMATORS = ("two_side", "one_side", "forward_grad")
RESAMPLE = ("step", "task")
PERTURBATIONS = ("gaussian", "rademacher")
# Options that are one per optimizer (they shape the sequence of forward passes).
GLOBAL_OPTIONS = ("q", "estimator", "conserve", "sparse_resample", "seed", "backend", "model")
# What a saved state must agree on to be loaded (load_state_dict): the optimizer-wide options
# that decide which forward passes a step runs, and the per-group ones that decide which z
# and which update rule (the other group options, lr first, are restored as in torch.optim).
STATE_GLOBAL_OPTIONS = ("q", "estimator", "conserve", "sparse_resample")
STATE_GROUP_OPTIONS = ("perturbation", "sign", "scalar_sign")
# Attributes a copy of the optimizer does not take over (see _ZOBase.__getstate__).
_NOT_COPIED = {"_tid", "_bucket_cache", "_step_token", "_stream_args", "_step_groups", "_step_opts",
               "_fg_names", "scalar_hook", "step_hook",
               "_gate", "_opt_called"}
# The counters a state_dict's "zeroflow" part holds, in the order load_state_dict assigns them.
COUNTERS = ("seed", "step", "task", "forward_passes", "queries", "steps_skipped")
# The learning rates torch's lr schedulers write into the groups they schedule (LRScheduler's
# initial_lr, OneCycleLR's max_lr / min_lr, SWALR's swa_lr).
SCHEDULER_LRS = ("initial_lr", "max_lr", "min_lr", "swa_lr")
# Keys of a param group that are no option of the optimizer: the parameters, and what torch's
# lr schedulers write into the groups (those rates, and OneCycleLR's momentum bounds); a state
# saved with or without a scheduler loads into an optimizer without or with one, as in torch.optim.
NOT_OPTIONS = {"params", "param_names", *SCHEDULER_LRS, "base_momentum", "max_momentum"}
# Parameters the fused kernels update in place (checked at construction, not at the first step).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Group options added after states were first saved, with the value a state without them
# meant: such a state still loads.
ADDED_GROUP_OPTIONS = {"stochastic_rounding": False, "state_dtype": "param"}
# Where a group's state buffers (momentum, history, Adam's m and v) live: in the parameter's
# dtype (torch.optim's rule) or in float32 (the kernels take either).
STATE_DTYPES = ("param", "float32")
PARAM_DEVICES = ("cpu", "cuda")
# The largest perturbation size: |z| <= 5.77 for both distributions (stream §5), so theta +- 2 zo_eps z
# stays below float32's max (3.4e38) and a skipped step's restore cannot turn theta into inf - inf.
MAX_ZO_EPS = 2.0 ** 123
# Consecutive steps whose every projected gradient is exactly 0 before the optimizer warns
# (once) that the perturbation does not reach the loss: one such step happens (a flat region, a
# loss coarser than zo_eps), three in a row almost always mean the closure's model is not the
# one holding these parameters.
ZERO_ESTIMATE_STEPS = 3

# Where a warning is attributed: the first frame outside these packages (the user's call to
# step(); torch.optim and torch.no_grad wrap step() in frames of their own, more or fewer by
# torch version, so a fixed stacklevel named torch/utils/_contextlib.py or optimizer.py).
_INTERNAL_FILES = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, zfkernels)) + (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,)


def _warn_at_caller(message: str, *, each_time: bool = False) -> None:
    """``warnings.warn(message, RuntimeWarning)`` attributed to the caller's code.

    ``each_time``: the message names its occasion (a step number) and is never repeated, so
    the caller module's ``__warningregistry__``, which remembers every text it has shown so
    that "default" shows it once, would gain an entry per call for nothing (a run skipping
    every step grew it by one entry a step); such a warning is issued without a registry,
    which shows it as before under every filter."""
    frame, level = sys._getframe(1), 2     # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_FILES):
        frame, level = frame.f_back, level + 1
    if not each_time or frame is None:
        warnings.warn(message, RuntimeWarning, stacklevel=level)
        return
    # No module_globals: with them warn_explicit asks the caller's loader for its source, and
    # __main__'s loader under `python -c` and at the prompt raises ImportError ("'__main__' is
    # not a built-in module") in place of the warning; the line is read from the file instead.
    warnings.warn_explicit(message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__", "<string>"), registry=None)


@contextlib.contextmanager
def _forward_ad_context():
    """What forward_grad's jvp runs under. ``scaled_dot_product_attention`` as the math
    backend: torch's fused attention kernels (flash on CPU, flash / memory-efficient / cuDNN on
    CUDA) have no forward-AD formula, and SDPA picked them anyway, so every timm ViT (fused_attn)
    and Hugging Face model (attn_implementation="sdpa") failed with torch's "Trying to use
    forward AD with _scaled_dot_product_flash_attention_for_cpu"; the math backend is the one
    that can run here. Another op without a formula (weight_norm's) gets a note that names
    forward_grad and the way out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    except (NotImplementedError, RuntimeError) as e:
        # torch's words for it: "Trying to use forward AD with <op>" (no formula), "... to use
        # it with forward mode AD" / "... functorch transforms (vmap, grad, jvp, ...)" (a custom
        # autograd.Function without jvp / setup_context)
        if re.search(r"mutate a captured Tensor", str(e)):
            # torch.func refuses an in-place write to a tensor the closure did not receive:
            # BatchNorm in train mode (its running statistics). The fix is eval mode, not another
            # estimator: a finite difference would run, but over 2q forwards that each update the
            # statistics and normalize with the batch's own (docs/algorithms.md §0, §3)
            _add_note(e, "zeroflow: estimator='forward_grad' runs the closure under forward-mode AD "
                         "(torch.func.jvp), which refuses an in-place write to a tensor the closure did not "
                         "receive: BatchNorm in train mode updates its running statistics so; put the model "
                         "(or its BatchNorm layers) in eval mode (model.eval()) for forward_grad steps")
        elif "inference tensor" in str(e):
            # the closure ran its forward under torch.inference_mode(), as MeZO-style closures do
            # (fine for the finite-difference estimators): the jvp's wrapped tensors cannot pass
            # through it, and torch said only "Cannot set version_counter for inference tensor"
            _add_note(e, "zeroflow: estimator='forward_grad' runs the closure under forward-mode AD "
                         "(torch.func.jvp), which cannot run through torch.inference_mode() inside the "
                         "closure; drop it there, or use torch.no_grad() instead (the step builds no autograd "
                         "graph either way). The ZO estimators (two_side, one_side) take inference_mode")
        elif "requires_grad_()" in str(e) and "functorch transform" in str(e):
            # Hugging Face's input-require-grads hook (gradient_checkpointing_enable(),
            # enable_input_require_grads(), PEFT's preparation of a model): torch said only "You are
            # attempting to call Tensor.requires_grad_() ... inside of a function being transformed by
            # a functorch transform"; gradient_checkpointing_disable() leaves that hook in place
            _add_note(e, "zeroflow: estimator='forward_grad' runs the closure under forward-mode AD "
                         "(torch.func.jvp), where the forward may not call requires_grad_(): a Hugging Face "
                         "model does so in a forward hook on its input embeddings after "
                         "gradient_checkpointing_enable() or enable_input_require_grads() (PEFT's preparation). "
                         "Remove the hook with model.disable_input_require_grads() (and turn checkpointing off "
                         "with model.gradient_checkpointing_disable(): a step without a backward saves nothing "
                         "by it), or train with a ZO estimator (estimator='two_side' or 'one_side'), which takes "
                         "the hook")
        elif re.search(r"forward[- ]?(mode )?AD|\bjvp\b", str(e), re.IGNORECASE):
            _add_note(e, "zeroflow: estimator='forward_grad' runs the closure under forward-mode AD "
                         "(torch.func.jvp), and an op or autograd.Function of this model cannot run there; "
                         "train it with a ZO estimator (estimator='two_side' or 'one_side'), which needs "
                         "only forward passes")
        raise


def _add_note(e: BaseException, note: str) -> None:
    """``e.add_note(note)`` where Python has it (3.11+); on 3.9 / 3.10 the error goes on
    without the note (calling it there raised AttributeError over the real error)."""
    if hasattr(e, "add_note"):
        e.add_note(note)


_EAGER_STEP: list = []     # [_ZOBase._step wrapped by torch.compiler.disable], made on first use


def _eager_step():
    """``_ZOBase._step`` run eagerly under torch.compile (``torch.compiler.disable``). A ZO step
    needs each loss on the host (seeds, skips, conserve's choice) and guards its kernels with
    signal handlers, so it is never one graph; traced into (a compiled function calling
    opt.step), dynamo made 13 graphs of its internals, warned about _thread.get_ident, and the
    step returned other loss values. A model compiled by the user still runs compiled inside
    the closure. Made on first use, and only once torch._dynamo is loaded (by torch.compile):
    decorating at import loaded it, 2 s added to ``import zeroflow.optim``. ~1.2 us a step."""
    if not _EAGER_STEP:
        try:
            wrapped = torch.compiler.disable(_ZOBase._step, reason="a zeroflow ZO step reads every loss on the host")
        except TypeError:      # torch < 2.8: no reason=
            wrapped = torch.compiler.disable(_ZOBase._step)
        _EAGER_STEP.append(wrapped)
    return _EAGER_STEP[0]


# Frozen-state Adam call used by conserve to move along the stored Adam direction
# (_frozen_adam_move; docs/algorithms.md §2): with beta = 1 - 2^-27, m and v come out of the
# op bit-identical, while the host bias correction 1 - beta^1 = 2^-27 stays exact and non-zero.
_FROZEN_BETA = 1.0 - 2.0 ** -27
_FROZEN_BC = 2.0 ** -27


class _ClosureModule(torch.nn.Module):
    """Wraps (model, closure) so that ``torch.func.functional_call`` can run the closure
    with the model's parameters replaced (Forward-Grad).

    The closure is held outside the module's attributes (:meth:`set_closure`): a closure that
    is an ``nn.Module`` (a loss module whose forward returns the loss) assigned as an attribute
    became a submodule, functional_call met the model's parameters under a second name, and the
    jvp left plain tensors in the model in place of its Parameters (the next step refused)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model
        self.set_closure(None)

    def set_closure(self, closure: Callable | None) -> None:
        self.__dict__["_closure"] = closure      # never a submodule, whatever the closure is

    def forward(self):
        loss = _call_closure(self._closure)
        if not isinstance(loss, torch.Tensor):       # else functorch's "expected f(*primals) to return only tensors"
            why = (": a number carries no derivative; return loss, not loss.item()" if isinstance(loss, numbers.Real)
                   else returned_hint(loss))
            raise TypeError(f"forward_grad: the closure must return the loss as a tensor computed from the model's "
                            f"parameters (it returned {type(loss).__name__}){why}")
        return loss


def returned_hint(x) -> str:
    """What to return instead of ``x``, a closure's result that is no loss, where it is a model's
    output (a Hugging Face ModelOutput: ``lambda: model(**batch)``, the usual first closure, whose
    errors named only its type); "" otherwise."""
    if not hasattr(x, "loss"):
        return ""
    if getattr(x, "loss", None) is None:
        return (": a model output whose loss is None (a Hugging Face model computes it only when given labels): "
                "pass labels and return its loss, e.g. lambda: model(**batch, labels=labels).loss")
    return ": a model output; return its loss, e.g. lambda: model(**batch).loss"


def _call_closure(closure):
    """``closure()``; a closure that calls ``backward()`` gets an error that says so instead
    of autograd's (which finds no graph: a ZO step runs under ``torch.no_grad()``; under
    forward_grad's jvp, functorch refuses backward)."""
    try:
        return closure()
    except RuntimeError as e:
        autograd_said = str(e)
        if not any(s in autograd_said for s in ("does not require grad", "does not have a grad_fn",
                                                 "backward() called inside a functorch transform")):
            raise
        # torch.autograd.grad of a loss that differentiates with respect to its inputs (a PINN
        # residual, a gradient penalty) fails with autograd's same words under the step's
        # no_grad: such a closure was told not to call backward(), which it never did
        # (not under forward_grad's jvp, where functorch refuses autograd.grad in any grad mode)
        inputs = "" if "functorch" in autograd_said else (
            " A loss that takes derivatives with respect to its inputs (torch.autograd.grad: a PINN residual, a "
            "gradient penalty) needs grad mode, which a ZO step turns off: compute those derivatives inside "
            "`with torch.enable_grad():` in the closure.")
        raise RuntimeError(
            "ZO closures must not call backward(): a zeroth-order step only needs the loss, so the closure "
            "should run the forward pass and return it (e.g. lambda: loss_fn(model(x), y)); zeroflow.optim."
            f"train_step calls backward itself for first-order optimizers.{inputs} (autograd said: "
            f"{autograd_said})") from e


def _scalar(loss, where: str) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss; {where} it returned a tensor of shape "
                f"{tuple(loss.shape)} (reduce it, e.g. .mean())"
            )
        try:
            return float(loss.item())      # any shape of one element; detach/reshape add ~3 us per loss
        except TypeError:               # a complex loss: float() raised Python's bare "not 'complex'"
            raise TypeError(f"the closure must return a real scalar loss; {where} it returned a {loss.dtype} "
                            "tensor") from None
    # a Python or numpy real (np.float32 was refused as "it returned float32", like a dtype)
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"the closure must return a scalar loss tensor; {where} it returned an object of type "
                    f"{type(loss).__module__}.{type(loss).__qualname__}{returned_hint(loss)}")


def _loss_tensor(x: float) -> torch.Tensor:
    """``torch.tensor(x)`` (a 0-dim float32 CPU tensor: the step's return value), in half its
    time (~5 us of ~10 us); ``scalar_tensor`` refuses a finite x beyond the float32 range,
    which ``torch.tensor`` rounds to inf, so that case takes the old path (same bits for
    every double: checked on 60k values incl. the overflow and subnormal edges)."""
    try:     # float32 named: under torch.set_default_dtype(torch.float64) both gave float64
        return torch.scalar_tensor(x, dtype=torch.float32)
    except RuntimeError:
        return torch.tensor(x, dtype=torch.float32)


class _InterruptGate:
    """Holds a ^C back while a step's kernels run, and lets it through while the closure runs.

    A ^C raises KeyboardInterrupt between two bytecodes, wherever Python is: landing right
    after a kernel call returned and before the step noted what it wrote, it left theta
    perturbed or updated twice (taken back for a call that had written). So for the whole step
    the SIGINT handler, and a Python SIGTERM handler (the CLI's turns SIGTERM into the same
    KeyboardInterrupt), are wrapped: a signal that comes while the gate is closed (kernels and
    their bookkeeping) is held, and handed to the original handler when the gate next opens
    (before the next closure call, where a failed closure would have stopped the step too, so
    a trajectory log replays it) or when the step ends (also a failed one); while the gate is open (the
    closure, ``scalar_hook``) it goes through at once. Main thread only (Python runs signal
    handlers there); ``_signal`` directly, as ``signal.signal`` converts handlers to enums at
    ~9 us a call against ~0.4 us here: the gate costs 3.3 us a step (install, two closure
    calls, release; thread time on this CPU while two test suites ran), the step's Python ~90."""

    SIGNALS = tuple(getattr(_sig, name) for name in ("SIGINT", "SIGTERM") if hasattr(_sig, name))

    def __init__(self):
        self.handlers: dict = {}      # signal -> the handler the gate replaced
        self.held: list = []          # (signal, frame) received while closed
        self.is_open = False
        self.receive = self._receive  # one bound method: what getsignal must return while installed

    @classmethod
    def close_for_step(cls) -> "_InterruptGate | None":
        if threading.current_thread() is not threading.main_thread():
            return None
        gate = cls()
        for sig in cls.SIGNALS:
            h = _sig.getsignal(sig)
            if callable(h):
                gate.handlers[sig] = h
                _sig.signal(sig, gate.receive)
        return gate if gate.handlers else None

    def _receive(self, sig, frame) -> None:
        if self.is_open:
            self.handlers[sig](sig, frame)
        else:
            self.held.append((sig, frame))

    def open(self) -> None:
        self.is_open = True
        self._deliver()

    def close(self) -> None:
        self.is_open = False

    def _deliver(self) -> None:
        while self.held:
            sig, frame = self.held.pop(0)
            self.handlers[sig](sig, frame)      # the default SIGINT handler raises KeyboardInterrupt

    def release(self, deliver: bool) -> None:
        """The original handlers back (unless the closure installed others meanwhile); then
        what was held, unless a KeyboardInterrupt is on its way already. Also after a step
        that failed otherwise (a kernel refusing a state buffer): a ^C held while it ran would
        have been dropped, and a loop that catches the error kept training."""
        for sig, h in self.handlers.items():
            if _sig.getsignal(sig) is self.receive:
                _sig.signal(sig, h)
        self.is_open = True
        if deliver:
            self._deliver()


class _Skip(Exception):
    """A step skipped (docs/algorithms.md §7): ``value`` is the loss it returns."""

    def __init__(self, value: float, why: str | None = None):
        self.value = value
        self.why = why or f"non-finite loss ({value})"


# The smallest double that rounds to inf in float32 (round to nearest even: halfway between
# FLT_MAX and 2^128 goes to 2^128). Every coefficient the kernels take is rounded to fp32
# (kernel-ops.md "Scalars").
_F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103


class _PendingPerturbation:
    """The perturbation a ZO step has put on theta and not yet taken back:
    ``theta = theta0 + units * eps_g * m * z(seed)`` (no perturbation while ``units`` is 0).
    The step's update takes it back in the same pass (``restore_scale``); a skipped or failed
    step takes it back with :meth:`undo`."""

    def __init__(self, opt: "_ZOBase", mask_seed: int):
        self._opt, self._mask_seed = opt, mask_seed
        self.seed, self.units = 0, 0.0

    def add(self, seed: int, units: float) -> None:
        """theta += units * eps_g * m * z(seed); ``seed`` is the pending one, or none is pending."""
        self._opt._perturb(seed, units, self._mask_seed)
        self.seed, self.units = seed, self.units + units

    def undo(self, buckets=None) -> None:
        """Take the perturbation back from ``buckets`` (default: every group's)."""
        if self.units:
            self._opt._perturb(self.seed, -self.units, self._mask_seed, buckets)
            self.units = 0.0

    def restore_scale(self, eps: float) -> float:
        """The update's ``restore_scale`` for a group of perturbation size ``eps``."""
        return -self.units * float(eps)


def _check_globals(q, estimator, conserve, sparse_resample, backend, model, where: str = "") -> None:
    """The optimizer-wide options (GLOBAL_OPTIONS but the seed), checked at construction and
    again before each step (``where``: "ZOFusedSGD." there, naming the attribute that was set)."""
    if not isinstance(q, int) or isinstance(q, bool) or q < 1:
        raise ValueError(f"{where}q={q!r} must be an int >= 1 (queries per step)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"{where}estimator={estimator!r} must be one of {ESTIMATORS}")
    if sparse_resample not in RESAMPLE:
        raise ValueError(f"{where}sparse_resample={sparse_resample!r} must be one of {RESAMPLE}")
    if backend not in ("auto",) + zfkernels.BACKENDS:
        raise ValueError(f"{where}backend={backend!r} must be one of {('auto',) + zfkernels.BACKENDS}")
    if not isinstance(conserve, bool):      # bool("False") turned conserve on
        raise ValueError(f"{where}conserve={conserve!r} must be True or False")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}model= must be the nn.Module the closure runs (or None), got {type(model).__name__}")
    if estimator == "forward_grad":
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{where}estimator='forward_grad' needs model=<the nn.Module the closure runs>")
        if conserve:
            raise ValueError(f"{where}conserve is not defined for estimator='forward_grad'")


class _ZOBase(torch.optim.Optimizer):
    """Shared machinery of the fused zeroth-order optimizers (not for direct use)."""

    zeroth_order = True
    _kind = "?"

    def __init__(self, params, defaults, *, q=1, estimator="two_side", conserve=False,
                 sparse_resample="step", seed=None, backend="auto", model=None):
        refuse_a_module(params)
        _check_globals(q, estimator, conserve, sparse_resample, backend, model)
        if seed is None:
            # Deterministic under torch.manual_seed, and consumes no random numbers.
            seed = torch.initial_seed() & (SEED_LIMIT - 1)
        self._seed = zfkernels.stream.check_seed(zfkernels.stream.integer_arg(
            seed, "seed", "an int in [0, 2**63), or None (derived from torch.initial_seed())"), "seed")
        self.q = q
        self.estimator = estimator
        self.conserve = conserve
        self.sparse_resample = sparse_resample
        self.backend = backend
        self.model = model
        self._tid: dict[int, int] = {}
        self._next_tid = 0
        self._bucket_cache: dict[int, list] = {}   # id(group) -> [key, buckets, step token]; see _buckets
        self._step_token: object | None = None       # a new object per step() call, None outside
        self._stream_args: dict[int, tuple[int, int]] = {}   # id(group) -> (dist, mask threshold), in step()
        # in step(): the groups and each one's options as the step found them (zo_eps a float).
        # Every perturbation, restore, estimate, update and conserve move of the step uses these,
        # so a closure (or a hook, a scheduler stepped inside it) that sets zo_eps, lr or another
        # option, or adds / drops a group, cannot make the restore differ from the perturbation
        # (theta was left perturbed by (eps_old - eps_new) z, or not restored at all), nor a
        # conserve move differ from the update it moves along (theta landed on no candidate)
        self._step_groups: tuple | None = None
        self._step_opts: dict[int, dict] = {}
        # counters saved by state_dict (COUNTERS, with the seed)
        self._n = 0                 # steps taken (skipped ones included): seed schedule index
        self._task = 0              # mask epoch for sparse_resample="task"
        self.forward_passes = 0     # total closure evaluations (a jvp counts as one)
        self.queries = 0            # total directions evaluated
        self.steps_skipped = 0      # steps skipped for a non-finite loss
        # per step, not saved: the step in progress, and what the last one found
        self._round_calls = 0       # stream §9 rounded update calls so far in this step
        self.forwards_last_step = 0
        self.last_projected: list[float] = []   # per query: (L+ - L-)/2, L+ - L0, or grad.v (forward_grad)
        self.conserve_choice = None             # conserve: -1 (theta-Delta), 0 (theta) or +1 (theta+Delta)
        self._zero_steps = 0                    # consecutive steps with every projected gradient 0
        # Hooks used by zeroflow.distributed and zeroflow.replay (docs/distributed.md):
        # every scalar a step consumes (closure losses; forward_grad: loss and grad.v) passes
        # through scalar_hook(values) -> values (an all-reduce, or a log playback), and each
        # finished step (skipped / aborted included) is reported to step_hook(opt, info).
        self.scalar_hook: Callable | None = None
        self.step_hook: Callable | None = None
        self._consumed: list[float] = []
        self._gate: _InterruptGate | None = None   # in step(): see _InterruptGate
        self._updating = self._eval_raised = False  # in step(): which phase an exception came from
        super().__init__(params, defaults)
        if not any(g["params"] for g in self.param_groups):
            # a forward-only user may freeze the whole model (model.requires_grad_(False)) to keep
            # autograd out; the error said what was missing, not that the optimizer trains only
            # the parameters that require grad, nor that requiring grad costs a ZO step nothing
            raise ValueError(
                "no parameter with requires_grad=True was given to the optimizer: it trains only those (frozen "
                "ones are ignored, docs/algorithms.md §0). Set requires_grad=True on the parameters to train "
                "before building it (e.g. model.requires_grad_(True)); a ZO step runs its forwards under "
                "torch.no_grad(), so no autograd graph is built for them")
        self._fg_wrapper = _ClosureModule(model) if estimator == "forward_grad" else None
        if self._fg_wrapper is not None:
            self._fg_name_params([p for g in self.param_groups for p in g["params"]])

    def _fg_name_params(self, params) -> None:
        """forward_grad: the names (in ``model``) that functional_call gives ``params``, read
        again from the model, which may have grown since (a new head added by
        add_param_group, the continual-learning pattern)."""
        names = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), "m." + name)
        for p in params:
            if id(p) not in names:
                raise ValueError(f"forward_grad: every optimized parameter must be a parameter of model= (one of "
                                 f"shape {tuple(p.shape)} is not); register it in the model before adding it")
        self._fg_names = names

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict:
        """torch.optim keeps ``defaults``, ``state`` and ``param_groups``; a copy (deepcopy,
        pickle, torch.save of the object) of a zeroflow optimizer also needs its options and
        counters to step, and to go on with the same seed schedule. The tensor ids go by
        position (they were keyed by ``id(param)``); caches are rebuilt; the hooks are not
        copied (torch.optim does not copy its own: they belong to the original's owners, a
        process group or a trajectory recorder). Nor is what an lr scheduler installs on the
        instance (its ``step`` wrapper holds the original: a copy stepped the original's
        parameters; ``_opt_called``): torch.optim's copies leave them behind too."""
        own = {k: v for k, v in self.__dict__.items()
               if k not in _NOT_COPIED and k not in ("defaults", "state", "param_groups")
               and not k.startswith("_optimizer_") and not _shadows_a_method(self, k)}
        tids = [self._tid[id(p)] for g in self.param_groups for p in g["params"]]
        return super().__getstate__() | own | {"_tids_by_position": tids}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        tids = state.pop("_tids_by_position", None)
        # an optimizer pickled before an option existed gets the value its groups meant then
        # (a pickle of an older zeroflow raised "an option is missing" at its next step)
        state["param_groups"] = _with_added_options(state.get("param_groups", []))
        super().__setstate__(state)
        # torch.optim's __setstate__ adds "differentiable" to defaults (an option of its own
        # optimizers): add_param_group gave it to every group added after a load or a copy, and
        # the next load refused that state as "another optimizer class"
        self.defaults.pop("differentiable", None)
        if tids is None:    # torch.optim's load_state_dict: only state and param_groups, same params
            return
        self.__dict__.setdefault("_zero_steps", 0)     # pickled before the zero-estimate check existed
        self._tid = {id(p): t for p, t in zip((p for g in self.param_groups for p in g["params"]), tids)}
        self._bucket_cache, self._step_token, self._stream_args = {}, None, {}
        self._step_groups, self._step_opts = None, {}
        self.scalar_hook = self.step_hook = None
        if self._fg_wrapper is not None:
            self._fg_name_params([p for g in self.param_groups for p in g["params"]])

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:     # a bare KeyError: 'params'
            raise ValueError("param_group has no 'params' entry (it has "
                             f"{', '.join(map(str, param_group)) or 'none'}); "
                             "give the tensors to optimize as {'params': [...], ...}")
        for opt in GLOBAL_OPTIONS:
            if opt in param_group:
                raise ValueError(f"{opt!r} is an optimizer-wide option, not a per-group one")
        ps = params_list(param_group["params"])
        for item in ps:
            t = item[1] if isinstance(item, tuple) else item
            if isinstance(t, torch.Tensor) and (t.is_sparse or t.layout != torch.strided):
                raise ValueError(
                    f"zeroflow optimizers need dense parameters; got one with layout {t.layout} "
                    "(sparse parameters are not supported)"
                )
        refuse_a_shared_parameter(self.param_groups, ps)
        param_group = dict(param_group, params=ps)
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        keep = [k for k, p in enumerate(g["params"]) if p.requires_grad]   # frozen params are ignored
        g["params"] = [g["params"][k] for k in keep]
        if "param_names" in g:
            g["param_names"] = [g["param_names"][k] for k in keep]
        try:
            self._check_group(g)
            self._check_params(g["params"], len(self.param_groups) - 1, g.get("param_names"))
            if getattr(self, "_fg_wrapper", None) is not None:     # set once __init__'s groups are in
                self._fg_name_params(g["params"])
        except Exception:
            self.param_groups.pop()
            raise
        for p in g["params"]:       # a fresh id, also where id(p) is that of a dropped parameter
            self._tid[id(p)] = self._next_tid
            self._next_tid += 1

    def _check_group(self, g: dict, where: str = "") -> None:
        """Every option of group ``g`` the kernels take, checked at construction, in
        add_param_group and load_state_dict, and at every step (a value set between steps)."""
        try:
            self._check_options(g)
        except (TypeError, KeyError) as e:     # e.g. None where a number belongs: '<' not supported
            raise ValueError(f"{where}an option is missing or not a number ({e}); "
                             f"the group holds {_options_of(g)}") from None
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    def _check_step_scalars(self, g: dict, where: str) -> None:
        """What this step derives from group ``g``'s options and the state (ZOFusedAdam's step
        size), checked before the step's first kernel call; nothing here for ZOFusedSGD."""

    def _check_options(self, g: dict) -> None:
        # finite too: lr, weight_decay or momentum = inf wrote +-inf into every parameter at the
        # first step (then every step was skipped for a non-finite loss)
        _check_rate(g, "lr")
        if not 0.0 < _number(g["zo_eps"], "zo_eps") <= MAX_ZO_EPS:
            raise ValueError(f"zo_eps={g['zo_eps']} must be > 0 and at most {MAX_ZO_EPS:.3g} (theta +- 2 zo_eps z "
                             "must stay finite in float32, or a skipped step could not restore theta)")
        if g["perturbation"] not in PERTURBATIONS:
            raise ValueError(f"perturbation={g['perturbation']!r} must be one of {PERTURBATIONS}")
        if not 0.0 <= _number(g["sparsity"], "sparsity") < 1.0:
            raise ValueError(f"sparsity={g['sparsity']} must be the fraction zeroed, in [0, 1)")
        if not 0.0 <= _number(g["history"], "history") < 1.0:
            raise ValueError(f"history={g['history']} must be the weight of the history, in [0, 1)")
        _check_rate(g, "weight_decay")
        for flag in ("stochastic_rounding", "sign", "scalar_sign"):
            if not isinstance(g[flag], bool):
                raise ValueError(f"{flag}={g[flag]!r} must be True or False")
        if not (isinstance(g["state_dtype"], str) and g["state_dtype"] in STATE_DTYPES):
            raise ValueError(f"state_dtype={g['state_dtype']!r} must be one of {STATE_DTYPES} (a string: the buffers "
                             "in the parameter's dtype, or in float32)")
        if g["sign"] and g["scalar_sign"]:
            raise ValueError("sign (element-wise, ZO-signSGD) and scalar_sign (public-code variant) are exclusive")
        # torch.optim's option, which a group dict carried here unread (torch.optim keeps any key):
        # the step minimized what the user asked to maximize
        if g.get("maximize"):
            raise ValueError("maximize=True: zeroflow's optimizers minimize the closure's loss; return the negated "
                             "objective from the closure to maximize it (and drop maximize)")

    def _check_params(self, params, group: int, names=None) -> None:
        """What the fused kernels need, checked now rather than at the first step: a supported
        dtype, contiguous memory, a cpu/cuda device the backend can run. ``names``: the group's
        param_names, if it was given (name, tensor) pairs."""
        for k, p in enumerate(params):
            # a lazy module's parameter: reading its shape raised torch's "... in load_state_dict"
            if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
                raise ValueError(f"parameter {k} of param group {group} is uninitialized (a lazy module, e.g. "
                                 "nn.LazyLinear): run one forward pass of the model (model(x)) before building "
                                 "the optimizer, so that its parameters have shapes")
            where = f"parameter {k} of param group {group} ({tuple(p.shape)}, {p.dtype}, {p.device})"
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(f"{where}: the fused kernels update float32, bfloat16 or float16 parameters; "
                                 f"convert the model first (e.g. model.float())")
            if p.device.type not in PARAM_DEVICES:
                raise ValueError(f"{where}: the fused kernels run on cpu or cuda tensors; materialize the model "
                                 f"on a real device first (e.g. model.to_empty(device='cpu') and load its weights)")
            if not p.is_contiguous():
                raise ValueError(f"{where} is not contiguous; the fused kernels need contiguous parameters "
                                 f"(e.g. model.to(memory_format=torch.contiguous_format))")
            zfkernels.resolve_backend(self.backend, p.device)   # ValueError/RuntimeError if it cannot run here
        # Every kernel refuses a list whose tensors share memory (docs/kernel-ops.md, "Errors"): a
        # parameter given twice (torch.optim only warns) or views of one storage that overlap
        # would fail every step, so they fail here. One check per device: one call per device.
        by_device: dict = {}
        for k, p in enumerate(params):
            by_device.setdefault(p.device, []).append(k)
        for ks in by_device.values():
            pair = overlapping_pair([("params", [params[k] for k in ks])])
            if pair is not None:
                (_, a), (_, b) = pair
                a, b = ks[a], ks[b]
                raise ValueError(f"{_which(a, names and names[a])} of param group {group} overlaps "
                                 f"{_which(b, names and names[b])} in memory (the same tensor given twice, e.g. a tied "
                                 "weight such as a language model's lm_head and input embedding with "
                                 "tie_word_embeddings, listed under both names by named_parameters(remove_duplicate="
                                 "False); or views of one storage); the fused kernels write each parameter in place "
                                 f"and need memory of its own for each: pass every parameter once ({_ONCE})")

    def _buckets(self, g: dict):
        """The group's params split by device (one fused call per device), validated:
        ``[(params, tensor_ids, backend), ...]`` with ``backend`` the concrete one
        (:func:`zfkernels.resolve_backend`) and ``tensor_ids`` the stream's ids.

        Cached per group: a step makes 3+ op calls and the per-call checks of the zfkernels
        face cost ~70 us each on the ViT-B list (152 tensors), as much as the host part of the
        op itself; the optimizer calls :func:`zfkernels.call_op` with these lists instead. The
        cache is keyed on the identity of the group's params, the first one's device and
        ``self.backend``, so editing ``g["params"]``, moving the model (``module.to`` keeps
        the Parameter objects) or setting ``backend`` rebuilds it; the key is checked once per
        step (building it costs ~10 us on the ViT-B list). What it does not hold is checked by
        every call's kernels: dtype, contiguity, one device per call (a partial move), the
        state buffers' shapes and devices."""
        hit = self._bucket_cache.get(id(g))
        token = self._step_token
        if hit is not None and token is not None and hit[2] is token:
            return hit[1]
        params = g["params"]
        key = (tuple(map(id, params)), params[0].device if params else None, self.backend)
        if hit is not None and hit[0] == key:
            hit[2] = token
            return hit[1]
        by_dev: dict = {}
        for k, p in enumerate(params):
            tid = self._tid.get(id(p))
            if tid is None:
                raise ValueError(f"parameter {k} of a param group was not given to the optimizer (was "
                                 "g['params'] edited?); add parameters with add_param_group")
            by_dev.setdefault(p.device, ([], []))
            by_dev[p.device][0].append(p)
            by_dev[p.device][1].append(tid)
        out = [(ps, ids, zfkernels.resolve_backend(self.backend, dev)) for dev, (ps, ids) in by_dev.items()]
        self._bucket_cache[id(g)] = [key, out, token]
        return out

    def _mask_seed(self, n: int) -> int:
        if self.sparse_resample == "task":
            return derive_seed(self._seed, self._task, QUERY_MASK_PER_TASK)
        return derive_seed(self._seed, n, QUERY_MASK_PER_STEP)

    def new_task(self) -> None:
        """Next mask epoch (sparse_resample="task": the mask is fixed within a task)."""
        self._task += 1

    def set_mask_epoch(self, k: int) -> None:
        """Set the mask epoch (task index) used when sparse_resample="task"."""
        self._task = counter(k, "set_mask_epoch(k): the mask epoch k")    # int(1.5) was 1; "a" a TypeError

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def step_count(self) -> int:
        return self._n

    # ------------------------------------------------------------------ kernels
    def _round_seed(self, g: dict) -> int:
        """Stream §9 rounding seed of the next parameter-writing update call of this step: the k-th
        call (from k = 0, every fused call in order: the update's, one per group and device, then
        conserve's moves') of step n uses
        seed(S, n, 2^32 - 3 - k) (docs/perturbation-stream.md §8), so replay rounds the same.
        Every call counts; the seed is only derived for a group with ``stochastic_rounding``
        (0 otherwise: the kernels ignore ``round_seed`` then, and a derivation costs ~7 us)."""
        k = self._round_calls
        self._round_calls += 1
        if not g["stochastic_rounding"]:
            return 0
        return derive_seed(self._seed, self._n, QUERY_ROUNDING - k)

    def _stream(self, g: dict) -> tuple[int, int]:
        """The group's ``(dist, mask_threshold)`` codes for the kernels: those checked at the
        start of this step (only step() calls the kernels, so they are always there)."""
        return self._stream_args[id(g)]

    def _opts(self, g: dict) -> dict:
        """The group's options as this step found them (see ``_step_groups``)."""
        return self._step_opts[id(g)]

    def _eps(self, g: dict) -> float:
        """The group's ``zo_eps`` as this step found it."""
        return self._step_opts[id(g)]["zo_eps"]

    def _groups(self):
        """The param groups of the step in progress (as it found them), else ``param_groups``."""
        groups = self._step_groups
        return self.param_groups if groups is None else groups

    def _all_buckets(self) -> list[tuple[dict, tuple]]:
        """``(group, bucket)`` for every group and device: the order of the fused calls."""
        groups = self._groups()
        if len(self._bucket_cache) > len(groups):
            # a group was dropped (param_groups.pop(), e.g. an old task's head): its cached
            # lists kept its parameters alive for the optimizer's lifetime. Its tensor ids go
            # too: keyed by id(param), a dead parameter's entry would let a tensor allocated at
            # its address into an edited g["params"] past _buckets' "was g['params'] edited?";
            # and its state (Adam's m and v, momentum), which no step reads again
            live = {id(g) for g in groups}
            for k in [k for k in self._bucket_cache if k not in live]:
                del self._bucket_cache[k]
            held = {id(p) for g in groups for p in g["params"]}
            self._tid = {k: t for k, t in self._tid.items() if k in held}
            for p in [p for p in self.state if id(p) not in held]:
                del self.state[p]
        return [(g, bk) for g in groups for bk in self._buckets(g)]

    def _perturb(self, seed: int, factor: float, mask_seed: int, buckets=None) -> None:
        """theta += factor * zo_eps_g * m * z(seed) over ``buckets`` (default: every group),
        one pass each; all or none: if a call fails (its kernel writes nothing then), the
        buckets already perturbed are taken back before the error goes on."""
        def perturb(g, bucket, f):
            (ps, ids, b), (dist, thr) = bucket, self._stream(g)
            zfkernels.call_op(b, "perturb_", params=ps, tensor_ids=ids, seed=seed, scale=f * self._eps(g),
                              dist=dist, mask_seed=mask_seed, mask_threshold=thr)

        done = []
        try:
            for g, bucket in self._all_buckets() if buckets is None else buckets:
                perturb(g, bucket, factor)
                done.append((g, bucket))
        except BaseException:
            for g, bucket in reversed(done):
                perturb(g, bucket, -factor)
            raise

    def _warn_once(self, what: str, message: str) -> None:
        """:func:`_warn_at_caller` the first time this optimizer meets ``what`` (flag
        ``_warned_<what>``: copied with the optimizer, absent from an older pickle)."""
        if not getattr(self, f"_warned_{what}", False):
            setattr(self, f"_warned_{what}", True)
            _warn_at_caller(message)

    def _check_loss_precision(self, loss) -> None:
        """Warn once per optimizer about a bf16 / fp16 loss: the loss differences that make the
        estimate are quantized to its ulp (near a loss of 5.5, bf16 steps by 0.03; an
        audit's run found 26 of 40 differences exactly 0 and the rest 5-15x too large)."""
        if isinstance(loss, torch.Tensor) and loss.dtype in (torch.bfloat16, torch.float16):
            self._warn_once(
                "loss_dtype",
                f"{type(self).__name__}: the closure returned a {loss.dtype} loss; a ZO estimate is a difference "
                "of two losses, which this precision rounds to its ulp (often to 0). Compute the loss in float32, "
                "e.g. F.cross_entropy(logits.float(), y) (Hugging Face's model(**batch).loss already is)")

    def _check_loss_graph(self, loss) -> None:
        """Warn once per optimizer about a loss that carries an autograd graph: the closure
        turned grad mode on inside the step's torch.no_grad() (``with torch.enable_grad():``,
        Lightning-style closures). The graph holds every activation (the memory ZO saves), and
        a backward() in such a closure fills ``.grad`` 2q times per step, unused: it passes
        the check that refuses backward() in a plain closure (no graph there)."""
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            self._warn_once(
                "loss_graph",
                f"{type(self).__name__}: the closure returned a loss with an autograd graph (it enabled grad inside "
                "the step's torch.no_grad()); a ZO step needs only the loss value. Run the forward without "
                "enable_grad and without backward() (e.g. lambda: loss_fn(model(x), y)): the graph keeps every "
                "activation in memory, and a backward() there computes gradients nobody uses. A loss that needs "
                "autograd itself (derivatives with respect to its inputs) can return loss.detach()")

    def _eval(self, closure, where: str) -> float:
        """One forward pass: the closure's loss, through ``scalar_hook``. The only part of a
        step that a ^C interrupts where it lands (a ^C that came while kernels ran is raised
        here, before the closure: see _InterruptGate)."""
        gate = self._gate
        grad_mode = torch.is_grad_enabled()
        try:
            if gate is not None:
                gate.open()
            try:
                loss = _call_closure(closure)
            finally:
                # a closure that switched grad mode on for good (torch.set_grad_enabled(True) as a
                # statement) made the next kernel call, and the undo of the perturbation after it,
                # refuse the parameters (they require grad): theta stayed perturbed
                torch.set_grad_enabled(grad_mode)
            self._check_loss_precision(loss)
            self._check_loss_graph(loss)
            val = _scalar(loss, where)
            if self.scalar_hook is not None:
                val = float(self.scalar_hook([val])[0])
        except BaseException:
            self._eval_raised = True
            raise
        finally:
            if gate is not None:
                gate.close()
        self._consumed.append(val)
        self.forward_passes += 1
        self._fw_step += 1
        return val

    # ------------------------------------------------------------------ step
    def step(self, closure=None):
        """One optimization step. ``closure`` runs a forward pass and returns the scalar
        loss (no backward); it is called 2q times (two_side), q+1 (one_side), +3 / +2 with
        conserve, q jvps (forward_grad). Returns the loss estimate of the point the step started
        from (the mean of (L+ + L-)/2 over the queries; one_side: L(theta)); with conserve, the
        loss of the point it kept. Runs eagerly under torch.compile (see _eager_step)."""
        if "torch._dynamo" in sys.modules:      # torch.compile may be tracing: keep it out
            return _eager_step()(self, closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure):
        if closure is None or not callable(closure):
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure that runs the forward pass and returns "
                "the loss, e.g. opt.step(lambda: loss_fn(model(x), y))"
            )
        if self._step_token is not None:
            # a step of this optimizer is running: its closure (or a hook, another thread) called
            # step() again. The inner step took the outer one's seeds and, ending, cleared what the
            # outer one needed to take its perturbation back: a KeyError left theta perturbed.
            raise RuntimeError(
                f"{type(self).__name__}.step() was called while a step of this optimizer was running (from its "
                "closure, a hook or another thread); a step's closure must only compute the loss. Called from the "
                "running step's closure, that step takes its perturbation back and raises this error too")
        # Claimed at once, not after the checks below: a second thread between the check above and
        # a later claim would run a step beside this one.
        self._step_token = object()
        try:
            # Every group's options, checked, and its stream options converted, once, before the
            # first kernel call changes theta: a bad value set between steps (a typo in a
            # schedule, zo_eps = 0) raises here, not after group 0 was perturbed.
            for i, g in enumerate(self.param_groups):
                self._check_group(g, f"param group {i}: ")
            # the optimizer-wide options are attributes a user may set between steps (a state
            # or a trajectory log records them): a misspelt estimator ran one_side without a
            # word, and q = 0 divided by zero after the step's forward passes
            _check_globals(self.q, self.estimator, self.conserve, self.sparse_resample, self.backend, self.model,
                           where=f"{type(self).__name__}.")
            for i, g in enumerate(self.param_groups):
                self._check_step_scalars(g, f"param group {i}: ")
            stream = {id(g): (dist_code(g["perturbation"]), mask_threshold(g["sparsity"])) for g in self.param_groups}
            n = self._n
            seeds = [derive_seed(self._seed, n, j) for j in range(self.q)]
            # The kernels read mask_seed only under a mask (threshold > 0): 0 otherwise, same bits,
            # one ~7 us derivation less.
            mask_seed = self._mask_seed(n) if any(thr for _, thr in stream.values()) else 0
            self._stream_args = stream
            self._step_groups = tuple(self.param_groups)
            self._step_opts = {id(g): _options_of(g) | {"zo_eps": float(g["zo_eps"])} for g in self.param_groups}
            self._fw_step = 0
            self._round_calls = 0
            self._consumed = []
            self._updating = self._eval_raised = False
        except BaseException:
            self._step_token, self._step_groups = None, None
            raise
        # No call between the two try blocks: a ^C (raised only at a call or a loop's jump)
        # landing between them left the claim above in place, and every later step refused
        status, gate, interrupted = "aborted", None, False
        try:
            gate = self._gate = _InterruptGate.close_for_step()
            if self.estimator == "forward_grad":
                loss = self._step_forward_grad(closure, seeds, mask_seed)
            else:
                loss = self._step_zo(closure, seeds, mask_seed)
            status = "ok"
        except _Skip as s:
            status = "skipped"
            self.steps_skipped += 1
            _warn_at_caller(
                f"{type(self).__name__}: {s.why} at step {n}; step skipped, "
                "parameters restored, step counter advanced", each_time=True)
            loss = _loss_tensor(s.value)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            if self._updating and not self._eval_raised:
                status = "failed"     # after its forwards, in a kernel call: see _update_all
            if isinstance(e, ValueError) and not self._eval_raised:
                self._explain_refusal(e)
            raise
        finally:
            self._step_token, self._stream_args, self._gate = None, {}, None
            self._step_groups, self._step_opts = None, {}
            self._n = n + 1
            self.forwards_last_step = self._fw_step
            try:
                if self.step_hook is not None:
                    self.step_hook(self, {"step": n, "task": self._task, "scalars": list(self._consumed),
                                          "status": status})
            finally:
                if gate is not None:     # a ^C held back while the last kernels ran comes now
                    gate.release(deliver=not interrupted)
        return loss

    def _explain_refusal(self, e: ValueError) -> None:
        """A kernel refused a parameter that changed after construction checked it (only
        dtype, contiguity and device are left to the kernels per step: see _buckets); the
        kernel's advice ("call .contiguous() on it") would make a copy the model never uses, so
        the note names the parameter and the fix. So for a parameter whose shape changed after its
        state was created (transformers' resize_token_embeddings resizes the input embedding in
        place): the kernel named its list's index and the buffer. Runs on failure only: checking
        every shape before each step would cost about as much as the step's own Python."""
        for i, g in enumerate(self.param_groups):
            names = g.get("param_names")
            for k, p in enumerate(g["params"]):
                for buf_name, buf in self.state.get(p, {}).items():
                    if buf_name != "step" and isinstance(buf, torch.Tensor) and buf.shape != p.shape:
                        who = _which(k, names and names[k])
                        _add_note(e, f"{type(self).__name__}: {who} of param group {i} is {tuple(p.shape)} now, its "
                                     f"{buf_name} {tuple(buf.shape)}: its shape changed after its state was created "
                                     "(e.g. model.resize_token_embeddings(n) after the optimizer was built: "
                                     "transformers resizes the input embedding in place). That state fits no longer: "
                                     "resize the model first and build the optimizer after resizing (an lm_head not "
                                     "tied to the embedding is a new tensor then, one this optimizer does not hold)")
                        return
                if p.dtype not in PARAM_DTYPES:
                    # the kernel names its own list index ("params[1] has dtype Double"), not the
                    # optimizer's parameter, and "use float32" reads as a cast of that tensor
                    _add_note(e, f"{type(self).__name__}: parameter {k} of param group {i} {tuple(p.shape)} is "
                                 f"{p.dtype} now: its dtype changed after the optimizer was built (e.g. "
                                 "model.double()). The fused kernels update float32, bfloat16 or float16 parameters "
                                 "in place: convert the model back (e.g. model.float()), or build the optimizer "
                                 "after converting it")
                    return
                if not p.is_contiguous():
                    _add_note(e, f"{type(self).__name__}: parameter {k} of param group {i} {tuple(p.shape)} is no "
                                 "longer contiguous: its memory format changed after the optimizer was built (e.g. "
                                 "model.to(memory_format=torch.channels_last)). The fused kernels update parameters "
                                 "in place: move the model back with model.to(memory_format=torch.contiguous_format) "
                                 "(p.contiguous() would be a copy the model does not use)")
                    return

    def _coeffs(self, g: dict, d: list[float], *, per_eps: bool = True) -> list[float]:
        """Per-group projected-gradient scalars c_j = d_j / (eps_g q) (d_j: loss
        difference per unit of the group's eps), or sign(d_j)/q with scalar_sign;
        ``per_eps=False`` (forward_grad, d_j = grad L . v_j): d_j / q."""
        q = self.q
        if self._opts(g)["scalar_sign"]:
            return [math.copysign(1.0, x) / q if x != 0 else 0.0 for x in d]
        unit = self._eps(g) * q if per_eps else q
        return [x / unit for x in d]

    def _step_coeffs(self, d: list[float], loss: float, *, per_eps: bool = True) -> dict:
        """:meth:`_coeffs` of every group, by ``id(group)``. §7: an estimate beyond float32's
        range (finite losses, e.g. 1e37 * sum(theta), whose difference over zo_eps overflows)
        skips the step like a non-finite loss (:class:`_Skip`, returning ``loss``): given to
        the kernels it was +-inf, and ZO-SGD wrote +-inf, ZO-Adam NaN, into every parameter."""
        coeffs = {id(g): self._coeffs(g, d, per_eps=per_eps) for g in self._groups()}
        for cs in coeffs.values():
            for c in cs:
                if not abs(c) < _F32_OVERFLOW:
                    raise _Skip(loss, f"projected gradient {c:.4g} beyond float32's range (finite losses)")
        return coeffs

    def _eval_finite(self, closure, where: str) -> float:
        """:meth:`_eval`; a non-finite loss skips the step (:class:`_Skip`)."""
        val = self._eval(closure, where)
        if not math.isfinite(val):
            raise _Skip(val)
        return val

    def _step_zo(self, closure, seeds, mask_seed):
        """The SPSA step (docs/algorithms.md §1): query the losses, then one fused update per
        group that also takes back the perturbation the last query left on theta; conserve
        (§2) then picks among theta0 - Delta, theta0, theta0 + Delta."""
        pending = _PendingPerturbation(self, mask_seed)
        try:
            L0, d, losses = self._query(closure, seeds, pending)
            coeffs = self._step_coeffs(d, sum(losses) / len(losses))
        except BaseException:
            pending.undo()                               # put theta back before skipping / raising
            raise
        sign_lr = -1.0 if self.conserve else 1.0        # conserve: land on theta0 + Delta first
        self._update_all(seeds, coeffs, mask_seed, pending, lr_mult=sign_lr)
        if not self.conserve:
            return _loss_tensor(sum(losses) / len(losses))
        return _loss_tensor(self._conserve(closure, L0, seeds, d, mask_seed))

    def _update_all(self, seeds, coeffs: dict, mask_seed: int, pending: _PendingPerturbation | None, *,
                    lr_mult: float) -> None:
        """One fused update per group and device (``coeffs``: per ``id(group)``), each taking
        back ``pending``'s perturbation in its pass (none for forward_grad)."""
        self._updating = True
        buckets = self._all_buckets()
        for k, (g, (ps, ids, b)) in enumerate(buckets):
            try:
                self._update(g, ps, ids, b, seeds, coeffs[id(g)], mask_seed,
                             restore_seed=pending.seed if pending else 0,
                             restore_scale=pending.restore_scale(self._eps(g)) if pending else 0.0, lr_mult=lr_mult)
            except BaseException as e:
                # The failed call wrote nothing (a kernel checks before it writes, and a ^C is
                # held back until the next closure call: _InterruptGate) and the calls after it
                # were not made: their perturbation is taken back. The calls before it are
                # applied (state advanced); only a state buffer replaced between steps gets here
                # (step() checked the rest). step_hook is told "failed": no log can replay it.
                if pending:
                    pending.undo(buckets[k:])
                if k:
                    _add_note(e, f"{type(self).__name__}: the update failed after {k} of the step's {len(buckets)} "
                                 "fused calls (one per param group and device) were applied; the parameters "
                                 "of the others are back at their values before the step")
                raise

    def _query(self, closure, seeds, pending) -> tuple[float | None, list[float], list[float]]:
        """The forward passes of one step: ``(L0, d, losses)`` with ``L0 = L(theta)`` (one_side
        or conserve, else None), ``d_j`` the loss difference along ``z(seeds[j])`` and the
        loss each query stands for. Leaves theta perturbed along the last query (``pending``)."""
        two = self.estimator == "two_side"
        L0 = self._eval_finite(closure, "at theta") if not two or self.conserve else None
        d: list[float] = []
        losses: list[float] = []
        for s in seeds:
            pending.undo()
            pending.add(s, 1.0)
            lp = self._eval_finite(closure, "at theta + eps z")
            if two:
                pending.add(s, -2.0)
                lm = self._eval_finite(closure, "at theta - eps z")
                d.append((lp - lm) / 2.0)
                losses.append((lp + lm) / 2.0)
            else:
                d.append(lp - L0)
                losses.append(L0)
        self.queries += len(seeds)
        self.last_projected = list(d)
        self._check_estimate(d)
        return L0, d, losses

    def _check_estimate(self, d: list[float]) -> None:
        """Warn once per optimizer after :data:`ZERO_ESTIMATE_STEPS` steps in a row whose every
        projected gradient was exactly 0: the losses did not move with the parameters, so
        nothing trains. Found by an audit in three ecosystem patterns, all silent before (as
        they are for torch.optim, where a ZO optimizer can see them for free):
        ``model.load_state_dict(sd, assign=True)`` after the optimizer was built (the model
        holds new tensors), ``torch.func.functional_call`` with a copied parameter dict, and a
        ``copy.deepcopy`` of the optimizer stepped against the original model."""
        if any(x != 0.0 for x in d):
            self._zero_steps = 0
            return
        self._zero_steps += 1
        if self._zero_steps == ZERO_ESTIMATE_STEPS:
            what = "directional derivative grad.v" if self.estimator == "forward_grad" else "loss difference"
            self._warn_once(
                "zero_estimate",
                f"{type(self).__name__}: every {what} of the last {ZERO_ESTIMATE_STEPS} steps was exactly 0, so "
                "nothing trains: the perturbation of the parameters does not reach the closure's loss. Check that "
                "the closure's model holds the tensors given to the optimizer (not after "
                "model.load_state_dict(..., assign=True), a copied model or optimizer, or functional_call with "
                "other tensors: build the optimizer on the parameters the forward uses), and that the loss is "
                "not piecewise constant or coarser than zo_eps (e.g. an accuracy, a bf16 loss)")

    def _conserve(self, closure, L0, seeds, d, mask_seed) -> float:
        """theta is at theta0 + Delta (state advanced once). Evaluate it and theta0 - Delta,
        keep the lowest of {theta0 - Delta, theta0, theta0 + Delta} (ties: in that order)."""
        at = 1.0
        try:
            lp = self._eval(closure, "at theta + Delta (conserve)")
            self._move(1.0, -1.0, seeds, d, mask_seed)
            at = -1.0
            lm = self._eval(closure, "at theta - Delta (conserve)")
        except BaseException:
            # The update is applied (its state advanced): land on theta0, the candidate that
            # needs no loss, as when conserve keeps theta0 (within the moves' rounding).
            self._move(at, 0.0, seeds, d, mask_seed)
            self.conserve_choice = 0.0
            raise
        cands = [(-1.0, lm), (0.0, L0), (1.0, lp)]
        key = [(v if math.isfinite(v) else math.inf) for _, v in cands]
        best = min(range(3), key=lambda i: key[i])
        a_best, v_best = cands[best]
        if a_best != -1.0:
            self._move(-1.0, a_best, seeds, d, mask_seed)
        self.conserve_choice = a_best
        return v_best

    def _step_forward_grad(self, closure, seeds, mask_seed):
        wrapper = self._fg_wrapper
        params = [p for g in self._groups() for p in g["params"]]
        if any(id(p) not in self._fg_names for p in params):
            # named inside a closure (add_param_group there): the model held functional_call's
            # tensors then, whose ids every later step missed (KeyError); read them again
            self._fg_name_params(params)
        names = [self._fg_names[id(p)] for p in params]
        self._check_model_holds(names, params)
        wrapper.set_closure(closure)
        primals = tuple(p.detach() for p in params)

        def f(*ts):
            return torch.func.functional_call(wrapper, dict(zip(names, ts)), ())

        d, losses = [], []
        gate = self._gate
        try:
            if gate is not None:
                gate.open()      # the jvps leave theta untouched: a ^C may land anywhere until the update
            for s in seeds:
                tangents = self._tangents(s, mask_seed)
                with torch.enable_grad(), _forward_ad_context():
                    loss, dd = torch.func.jvp(f, primals, tuple(tangents[id(p)] for p in params))
                del tangents
                val = _scalar(loss, "under jvp")
                self.forward_passes += 1
                self._fw_step += 1
                ddv = _scalar(dd, "(its directional derivative)")
                if self.scalar_hook is not None:
                    val, ddv = (float(x) for x in self.scalar_hook([val, ddv]))
                self._consumed += [val, ddv]
                if not (math.isfinite(val) and math.isfinite(ddv)):
                    raise _Skip(val if not math.isfinite(val) else ddv)
                d.append(ddv)
                losses.append(val)
            self.queries += len(seeds)
            self.last_projected = list(d)
            self._check_estimate(d)
        except BaseException:
            self._eval_raised = True
            raise
        finally:
            wrapper.set_closure(None)
            if gate is not None:
                gate.close()
        coeffs = self._step_coeffs(d, sum(losses) / len(losses), per_eps=False)
        self._update_all(seeds, coeffs, mask_seed, None, lr_mult=1.0)
        return _loss_tensor(sum(losses) / len(losses))

    def _tangents(self, seed: int, mask_seed: int) -> dict:
        """forward_grad's tangents m * z(seed), by ``id(param)``: zeros perturbed by one fused
        call per group and device (the cached buckets), as :func:`zfkernels.perturbation`
        makes them one tensor at a time. One call, not one per tensor: on CUDA every tensor
        list is a launch table of its own, and a query's 152 one-tensor tables (ViT-B), cycled
        in a fixed order through the least-recently-used cache of csrc/ops_cuda.cu (64 tables
        then), missed on every call (an upload and a stream sync each; read from the cache's
        policy, not timed on a device)."""
        out = {}
        for g, (ps, ids, b) in self._all_buckets():
            dist, thr = self._stream(g)
            zs = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in ps]
            zfkernels.call_op(b, "perturb_", params=zs, tensor_ids=ids, seed=seed, scale=1.0, dist=dist,
                              mask_seed=mask_seed, mask_threshold=thr)
            out.update(zip(map(id, ps), zs))
        return out

    def _check_model_holds(self, names: list[str], params: list) -> None:
        """forward_grad: the jvp puts the optimizer's tensors into ``model`` by name. Where the
        model holds another tensor under that name (``load_state_dict(sd, assign=True)``, a
        replaced module), the step would differentiate and update the optimizer's tensors while
        the model kept its own, untouched for the rest of the run, without a word (the ZO
        estimators see it as zero loss differences: _check_estimate). Refused before the step
        runs. Costs ~0.3 ms a step on timm's ViT-B (152 tensors, named_parameters' walk, this
        CPU), against a jvp of tens of milliseconds on a GPU; the (module, name) slots alone
        would cost 10 us but miss a replaced module, whose name the jvp fills all the same."""
        held = dict(self.model.named_parameters(remove_duplicate=False))
        for name, p in zip(names, params):
            if held.get(name[2:]) is not p:
                raise ValueError(
                    f"{type(self).__name__}(estimator='forward_grad'): the model's parameter {name[2:]!r} is no "
                    "longer the tensor this optimizer trains (the model holds another one, e.g. after "
                    "model.load_state_dict(..., assign=True) or a replaced module), so the step would train tensors "
                    "the model does not use. Build the optimizer again on the model's parameters (and load this "
                    "one's state_dict into it to keep its state)")

    # ------------------------------------------------------------------ state
    def _counters(self) -> dict:
        return {
            "stream": STREAM_VERSION, "optimizer": type(self).__name__, "seed": self._seed, "step": self._n,
            "task": self._task, "forward_passes": self.forward_passes, "queries": self.queries,
            "steps_skipped": self.steps_skipped, **{k: getattr(self, k) for k in STATE_GLOBAL_OPTIONS},
            # by position over the groups: positions no longer, once a group was dropped
            "tensor_ids": [self._tid.get(id(p)) for g in self.param_groups for p in g["params"]],
            "next_tensor_id": self._next_tid,
        }

    def state_dict(self):
        return state_dict_with_hooks(self, lambda: self._state_dict_of_groups() | {"zeroflow": self._counters()})

    def _state_dict_of_groups(self) -> dict:
        """torch.optim's state_dict, of the parameters in the groups: the state of one in no
        group (its group dropped since the last step, which frees it: _all_buckets) has no id
        in the saved format, and torch.optim raised a bare KeyError on it."""
        held = {id(p) for g in self.param_groups for p in g["params"]}
        state = self.state
        if all(id(p) in held for p in state):
            return super().state_dict()
        self.state = {p: s for p, s in state.items() if id(p) in held}     # read only by that state_dict
        try:
            return super().state_dict()
        finally:
            self.state = state

    def check_state_dict(self, state_dict) -> None:
        """Raise ``ValueError`` naming the first mismatch if ``state_dict`` cannot be loaded
        into this optimizer: another optimizer class or stream version, other optimizer-wide
        options (q, estimator, conserve, sparse_resample), other group keys, another
        perturbation or sign rule, another number of groups or parameters, buffers of other
        shapes. States saved before the class and options were recorded are checked on
        what they hold."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state_dict (a mapping with 'state' and 'param_groups')")
        me = type(self).__name__
        c = state_dict.get("zeroflow")
        if not isinstance(c, dict):
            raise ValueError("state_dict lacks the 'zeroflow' counters (seed, step); "
                             "was it saved by a zeroflow optimizer?")
        if c.get("optimizer", me) != me:
            raise ValueError(f"state_dict was saved by {c['optimizer']}; this is a {me}")
        if c.get("stream") != STREAM_VERSION:
            raise ValueError(f"state_dict was saved with perturbation stream {c.get('stream')!r}, "
                             f"this is {STREAM_VERSION!r}")
        missing = [k for k in COUNTERS if k not in c]
        if missing:
            raise ValueError(f"state_dict's 'zeroflow' counters lack {', '.join(missing)}")
        for k in COUNTERS:
            counter(c[k], f"state_dict's 'zeroflow' counter {k!r}", limit=SEED_LIMIT if k == "seed" else None)
        for k in STATE_GLOBAL_OPTIONS:
            if k in c and c[k] != getattr(self, k):
                raise ValueError(f"state_dict was saved with {k}={c[k]!r}, this optimizer has "
                                 f"{k}={getattr(self, k)!r}; build it with the same options to continue that run")
        _check_layout(state_dict)
        _check_tensor_ids(c, state_dict["param_groups"])
        saved_groups = _with_added_options(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        shapes = {}
        for i, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            keys, mine = set(sg) - NOT_OPTIONS, set(g) - NOT_OPTIONS
            if keys != mine:
                extra, lacks = sorted(keys - mine), sorted(mine - keys)
                raise ValueError(f"state_dict param group {i} does not fit a {me}"
                                 + (f": it has {', '.join(extra)}" if extra else "")
                                 + (f"{',' if extra else ':'} it lacks {', '.join(lacks)}" if lacks else "")
                                 + " (a state of another optimizer class?)")
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"state_dict param group {i} has {len(sg['params'])} parameters, this optimizer "
                                 f"{len(g['params'])}")
            for k in STATE_GROUP_OPTIONS:
                if sg[k] != g[k]:
                    raise ValueError(f"state_dict param group {i} was saved with {k}={sg[k]!r}, this optimizer has "
                                     f"{k}={g[k]!r}; build it with the same options to continue that run")
            self._check_group(sg, f"state_dict param group {i}: ")
            shapes.update({pid: tuple(p.shape) for pid, p in zip(sg["params"], g["params"])})
        for pid, st in state_dict["state"].items():
            for name, buf in st.items():     # every buffer but Adam's step count has its parameter's shape
                if name == "step":
                    # an int, or torch.optim.Adam's one-element tensor; >= 0 and whole: a step of -5
                    # (or 2.5) loaded, then every step failed after its forwards (the Adam step 0)
                    n = buf.item() if isinstance(buf, torch.Tensor) and buf.numel() == 1 else buf
                    if not (isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0
                            and float(n).is_integer()):
                        raise ValueError(f"state_dict's step of parameter {pid} is {buf!r}, not a count (an int >= 0)")
                elif not isinstance(buf, torch.Tensor):
                    raise ValueError(f"state_dict's {name} of parameter {pid} is {type(buf).__name__}, not a tensor")
                elif tuple(buf.shape) != shapes.get(pid):
                    raise ValueError(f"state_dict's {name} of parameter {pid} has shape {tuple(buf.shape)}, the "
                                     f"parameter {shapes.get(pid)}")
        for i, sg in enumerate(saved_groups):
            # a group's buffers are created together (the kernels' *_init flag is read from its
            # first parameter): a state with some missing would be re-initialised or zero-filled
            held = {frozenset(state_dict["state"].get(pid, {})) for pid in sg["params"]}
            if len(held) > 1:
                raise ValueError(f"state_dict param group {i}: its parameters hold different state entries "
                                 f"({' / '.join(sorted(', '.join(sorted(h)) or 'none' for h in held))}); a zeroflow "
                                 "group holds the same entries for every parameter (a state edited by hand?)")

    def load_state_dict(self, state_dict):
        """torch.optim semantics (buffers and group options restored; load-state-dict hooks
        around it), after :meth:`check_state_dict`: a state that does not fit raises and
        changes nothing."""
        load_with_hooks(self, state_dict, self._load_checked)

    def _load_checked(self, state_dict) -> None:
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)       # the options added since it was saved: __setstate__
        c = state_dict.pop("zeroflow")
        super().load_state_dict(state_dict)
        self._keep_float32_buffers(state_dict)
        self._bucket_cache.clear()      # new group dicts (the keys would still catch a stale entry)
        self._seed, self._n, self._task, self.forward_passes, self.queries, self.steps_skipped = (
            operator.index(c[k]) for k in COUNTERS)
        if "tensor_ids" in c:       # a state saved before they were: the ids are the positions
            self._restore_tensor_ids(c["tensor_ids"], c["next_tensor_id"])

    def _restore_tensor_ids(self, ids, next_id: int) -> None:
        """Give the parameters, in group order, the tensor ids a saved state or a trajectory
        log's header holds (checked there), and the next id to give: once a group was dropped
        they are not the positions. Cached bucket lists carry the old ids: dropped."""
        params = [p for g in self.param_groups for p in g["params"]]
        self._tid = dict(zip(map(id, params), map(operator.index, ids)))
        self._next_tid = operator.index(next_id)
        self._bucket_cache.clear()

    def _keep_float32_buffers(self, state_dict) -> None:
        """torch.optim's load casts every state buffer to its parameter's dtype: a float32
        buffer of a bf16 / fp16 parameter (``state_dtype="float32"``) came back rounded to
        bf16 and the run went on with other numbers. Such buffers are taken from the saved
        state again, as saved (the kernels take either dtype), and shared with it where the
        device matches, as torch.optim shares a buffer whose dtype already matches: a copy
        held a second float32 state (four times the bf16 parameters' bytes for Adam) until
        the caller dropped the dict."""
        saved = state_dict["state"]
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                for name, buf in saved.get(pid, {}).items():
                    if (name != "step" and isinstance(buf, torch.Tensor) and buf.dtype == torch.float32
                            and p.dtype != torch.float32):
                        self.state[p][name] = buf.to(device=p.device)

    def _states(self, ps) -> list[dict]:
        """The state dicts of ``ps`` (created empty where missing), read once per update call:
        every ``self.state[p]`` hashes a Parameter through Python (~0.15 us, 23 us per pass
        over the ViT-B list). Read each step, not cached: torch.optim lets a user replace a
        state entry or a buffer between steps."""
        return list(map(self.state.__getitem__, ps))

    @staticmethod
    def _buffers(g: dict, sts: list[dict], ps, name: str) -> tuple[list[torch.Tensor], bool]:
        """The buffers ``name`` of ``ps`` (state dicts ``sts``), zeros created where missing
        (in the group's ``state_dtype``), and whether the first one was missing (the kernels'
        ``*_init`` flag)."""
        try:
            return [st[name] for st in sts], False
        except KeyError:
            fresh = name not in sts[0]
            dtype = torch.float32 if g["state_dtype"] == "float32" else None
            # normal tensors even when the first step runs under torch.inference_mode() (MeZO
            # style): inference tensors there made every later step outside it fail
            with torch.inference_mode(False):
                for st, p in zip(sts, ps):
                    if name not in st:
                        st[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            return [st[name] for st in sts], fresh

    def _history(self, g, sts, ps):
        if g["history"] == 0.0:
            return [], False
        return self._buffers(g, sts, ps, "history")


class ZOFusedSGD(_ZOBase):
    r"""Zeroth-order SGD (ZO-SGD, ZO-SGD-Sign, ZO-SGD-Conserve, Forward-Grad) on fused kernels.

    ``opt.step(closure)``: ``closure()`` runs the forward pass and returns the scalar loss.

    Per-group options: ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``
    (torch.optim.SGD semantics), ``zo_eps`` (perturbation size), ``perturbation``
    ("gaussian" | "rademacher"), ``sign`` (element-wise sign of the estimate, ZO-signSGD),
    ``scalar_sign`` (sign of the projected scalar times z, as public ZO code does),
    ``history`` (alpha of g = alpha*g_hist + (1-alpha)*g_new; 0 = off), ``sparsity``
    (fraction of coordinates zeroed by the seed-based mask), ``stochastic_rounding`` (bf16/fp16
    parameters: store every update with the unbiased stochastic rounding of stream §9, so that
    updates far below half an ulp are kept in expectation; fp32: no effect), ``state_dtype``
    ("param": the buffers in the parameter's dtype, as torch.optim; "float32": in float32,
    for bf16/fp16 parameters whose buffers' updates would round away; it acts where a buffer
    is created, at its first step; a loaded float32 buffer stays float32, and a loaded state
    brings its groups' state_dtype, "param" for one saved before the option existed, as
    torch.optim's load brings every group option: set it again after loading to change it).
    Optimizer-wide: ``q`` (queries/step), ``estimator`` ("two_side" | "one_side" |
    "forward_grad", the latter needs ``model=``), ``conserve``, ``sparse_resample``
    ("step" | "task"), ``seed``, ``backend``. Formulas: docs/algorithms.md.
    Memory: no param-sized tensor without momentum/history; + momentum buffer; + history.

    bf16/fp16 parameters: perturbing and restoring round at every store, so theta comes back
    to its start only where ``zo_eps * z`` is a whole number of ulps of the weight; elsewhere
    the restore alone moves weights by about an ulp (Gaussian z: any step). With Rademacher z
    a power-of-two ``zo_eps`` (e.g. ``2**-8`` in bf16, weights below 1) keeps almost every
    restore exact; docs/algorithms.md §7 and §11 (measured there).
    """

    _kind = "sgd"

    def _check_options(self, g: dict) -> None:
        super()._check_options(g)
        _check_rate(g, "momentum")
        if not 0.0 <= _number(g["dampening"], "dampening") <= 1.0:
            raise ValueError(f"dampening={g['dampening']} must be in [0, 1]")
        if not isinstance(g["nesterov"], bool):
            raise ValueError(f"nesterov={g['nesterov']!r} must be True or False")
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 zo_eps=1e-3, q=1, perturbation="gaussian", estimator="two_side", sign=False,
                 scalar_sign=False, conserve=False, sparsity=0.0, sparse_resample="step", history=0.0,
                 stochastic_rounding=False, state_dtype="param", backend="auto", seed=None,
                 model=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, zo_eps=zo_eps, perturbation=perturbation, sign=sign,
                        scalar_sign=scalar_sign, sparsity=sparsity, history=history,
                        stochastic_rounding=stochastic_rounding, state_dtype=state_dtype)
        super().__init__(params, defaults, q=q, estimator=estimator, conserve=conserve,
                         sparse_resample=sparse_resample, seed=seed, backend=backend, model=model)

    def _update(self, g, ps, ids, b, seeds, coeffs, mask_seed, *, restore_seed, restore_scale, lr_mult):
        o = self._opts(g)
        mom = o["momentum"]
        bufs, m_init, hist, h_init = [], False, [], False
        if mom != 0.0 or o["history"] != 0.0:
            sts = self._states(ps)
            if mom != 0.0:
                bufs, m_init = self._buffers(o, sts, ps, "momentum_buffer")
            hist, h_init = self._history(o, sts, ps)
        dist, thr = self._stream(g)
        zfkernels.call_op(
            b, "zo_sgd_update_", params=ps, momentum_buffers=bufs, history_buffers=hist, tensor_ids=ids,
            seeds=seeds, coeffs=coeffs, dist=dist, mask_seed=mask_seed, mask_threshold=thr, restore_seed=restore_seed,
            restore_scale=restore_scale, lr=lr_mult * float(o["lr"]), weight_decay=o["weight_decay"],
            momentum=mom, dampening=o["dampening"], nesterov=o["nesterov"], momentum_init=m_init,
            sign=o["sign"], history_alpha=o["history"], history_init=h_init,
            stochastic_rounding=o["stochastic_rounding"], round_seed=self._round_seed(o),
        )

    def _move(self, a, b, seeds, d, mask_seed):
        """Conserve: move theta0 + a*Delta -> theta0 + b*Delta with the state frozen
        (history alpha=1, momentum=1 & dampening=1 leave h and buf bit-identical)."""
        for g in self._groups():
            o = self._opts(g)
            lr, wd, mom = float(o["lr"]), float(o["weight_decay"]), float(o["momentum"])
            if lr == 0.0:
                continue
            coeffs, (dist, thr) = self._coeffs(g, d), self._stream(g)
            for ps, ids, be in self._buckets(g):
                sts = self._states(ps)
                lr1 = 0.0
                if mom == 0.0 or o["nesterov"]:
                    # p <- p(1 - lr1 wd) - lr1 * g~ ; g~ regenerated (or the frozen history)
                    lr1 = lr * (a - b) / (1.0 + a * lr * wd)
                    hist = [st["history"] for st in sts] if o["history"] else []
                    zfkernels.call_op(
                        be, "zo_sgd_update_", params=ps, history_buffers=hist, tensor_ids=ids,
                        seeds=[] if hist else seeds, coeffs=[] if hist else coeffs, dist=dist,
                        mask_seed=mask_seed, mask_threshold=thr, lr=lr1, weight_decay=wd, sign=o["sign"],
                        history_alpha=1.0, history_init=False, stochastic_rounding=o["stochastic_rounding"],
                        round_seed=self._round_seed(o))
                if mom != 0.0:
                    # p <- p - lr2 * buf (buf = 1*buf + 0*0: frozen)
                    lr2 = lr * mom * (a * (1.0 - lr1 * wd) - b) if o["nesterov"] else lr * (a - b)
                    bufs = [st["momentum_buffer"] for st in sts]
                    zfkernels.call_op(
                        be, "zo_sgd_update_", params=ps, momentum_buffers=bufs, tensor_ids=ids, seeds=[],
                        coeffs=[], dist=dist, lr=lr2, momentum=1.0, dampening=1.0, momentum_init=False,
                        stochastic_rounding=o["stochastic_rounding"], round_seed=self._round_seed(o))


_F32_TINY = torch.finfo(torch.float32).tiny    # the smallest eps ZOFusedAdam takes (2^-126)


class ZOFusedAdam(_ZOBase):
    r"""Zeroth-order Adam / AdamW (ZO-Adam, ZO-Adam-Sign, ZO-Adam-Conserve) on fused kernels:
    exactly ``torch.optim.Adam`` (``decoupled_weight_decay=True``: ``AdamW``) fed the ZO
    estimate as ``.grad``, in one pass over theta, m, v (and h). Options as
    :class:`ZOFusedSGD` plus ``betas``, ``eps``, ``decoupled_weight_decay``.
    Memory: m and v (and h with ``history``). bf16/fp16 parameters: the restore is exact only
    where ``zo_eps * z`` is a whole number of ulps, as for :class:`ZOFusedSGD`; m and v in
    bf16 (the default, torch.optim's rule) lose every update of v below half a bf16 ulp: with
    beta2 = 0.999, v stops following a gradient scale that falls (an audit: v stuck at 0.74
    from step 1000 to 3000 where float32 state went from 0.60 to 0.09, steps ~3x too small).
    Pass ``state_dtype="float32"`` (twice the state memory of bf16). In fp16, v underflows to 0
    for estimates below ~5.5e-3 and those coordinates move by lr |g| / eps: float32 state is
    needed there (the optimizer warns, docs/algorithms.md §8)."""

    _kind = "adam"

    def _check_options(self, g: dict) -> None:
        super()._check_options(g)
        betas = g["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= _number(b, "betas") < 1.0 for b in betas)):
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        eps = _number(g["eps"], "eps")
        # torch.optim.Adam takes eps=0, but a ZO estimate is exactly 0 far more often than a gradient
        # entry, and a coordinate whose every estimate so far was 0 has m = v = 0: the update divides
        # 0 by 0 and writes NaN into the parameter (all of them after a first step whose loss
        # difference is 0, the masked ones at every step with sparsity > 0). An eps that is 0 in
        # float32, where the kernels compute, is the same; below float32's smallest normal, too
        # (a backend may flush subnormals).
        if 0.0 <= eps < _F32_TINY:
            raise ValueError(
                f"eps={g['eps']} must be > 0 (at least {_F32_TINY:.3g}, float32's smallest normal number): with "
                "eps=0 a coordinate whose zeroth-order estimate was exactly 0 at every step so far has m = v = 0, and "
                "its update 0/0 writes NaN into the parameter (every coordinate after a first step whose loss "
                "difference is exactly 0, e.g. a flat region or a bf16 loss; a masked one at every step with "
                "sparsity > 0). torch.optim.Adam takes eps=0 because a gradient entry is rarely exactly 0; give a "
                "small eps instead (the default 1e-8, or e.g. 1e-30 to stay close to eps=0)")
        if not 0.0 < eps < _F32_OVERFLOW:
            # the reason of this value only: eps=-1 or nan is not refused for what inf would do
            why = (_IN_F32 if _F32_OVERFLOW <= eps < math.inf else
                   " (eps=inf makes every update 0)" if eps == math.inf else "")
            raise ValueError(f"eps={g['eps']} must be > 0 and finite{why}")
        if not isinstance(g["decoupled_weight_decay"], bool):
            raise ValueError(f"decoupled_weight_decay={g['decoupled_weight_decay']!r} must be True or False")
        if g.get("amsgrad"):       # as maximize: a group key torch.optim.Adam reads, ignored here
            raise ValueError("amsgrad=True: ZOFusedAdam has no AMSGrad variant (its fused update keeps m and v "
                             "only); drop amsgrad")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 decoupled_weight_decay=False, zo_eps=1e-3, q=1, perturbation="gaussian",
                 estimator="two_side", sign=False, scalar_sign=False, conserve=False, sparsity=0.0,
                 sparse_resample="step", history=0.0, stochastic_rounding=False, state_dtype="param",
                 backend="auto", seed=None, model=None):
        betas = tuple(betas) if isinstance(betas, (list, tuple)) else betas     # checked with the group
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, zo_eps=zo_eps,
                        perturbation=perturbation, sign=sign, scalar_sign=scalar_sign,
                        sparsity=sparsity, history=history, stochastic_rounding=stochastic_rounding,
                        state_dtype=state_dtype)
        super().__init__(params, defaults, q=q, estimator=estimator, conserve=conserve,
                         sparse_resample=sparse_resample, seed=seed, backend=backend, model=model)
        # said before the first step runs (and, under a warnings filter that raises, before it
        # moves anything); a parameter that becomes float16 later is found when its v is created
        for g in self.param_groups:
            if g["state_dtype"] == "param" and any(p.dtype == torch.float16 for p in g["params"]):
                self._warn_fp16_v(g)
                break

    def _update(self, g, ps, ids, b, seeds, coeffs, mask_seed, *, restore_seed, restore_scale, lr_mult):
        o = self._opts(g)
        sts = self._states(ps)
        ms, _ = self._buffers(o, sts, ps, "exp_avg")
        vs, fresh = self._buffers(o, sts, ps, "exp_avg_sq")
        if fresh and any(v.dtype == torch.float16 for v in vs):
            self._warn_fp16_v(o)
        hist, h_init = self._history(o, sts, ps)
        t = int(sts[0].get("step", 0)) + 1
        dist, thr = self._stream(g)
        zfkernels.call_op(
            b, "zo_adam_update_", params=ps, exp_avgs=ms, exp_avg_sqs=vs, history_buffers=hist, tensor_ids=ids,
            seeds=seeds, coeffs=coeffs, dist=dist, mask_seed=mask_seed, mask_threshold=thr,
            restore_seed=restore_seed, restore_scale=restore_scale,
            lr=lr_mult * float(o["lr"]), beta1=o["betas"][0], beta2=o["betas"][1], eps=o["eps"],
            weight_decay=o["weight_decay"], decoupled_weight_decay=o["decoupled_weight_decay"], step=t, sign=o["sign"],
            history_alpha=o["history"], history_init=h_init, stochastic_rounding=o["stochastic_rounding"],
            round_seed=self._round_seed(o),
        )
        for st in sts:
            st["step"] = t

    def _warn_fp16_v(self, o: dict) -> None:
        """Warn once per optimizer when v is created in float16 (float16 parameters, state_dtype
        "param"): (1 - beta2) g^2 rounds to 0 there for a small |g| while m = (1 - beta1) g does
        not, and such a coordinate's update lr/bc1 m / (0 + eps) is lr |g| / eps at the first
        step. An audit's tiny fp16 Llama (ZO-Adam, lr 1e-4, eps 1e-8): weights moved by up to 52
        in one step and the loss went from 4.9 to 9. A ZO estimate g = c z is that small on many
        coordinates (every Gaussian z near 0, every step with a small loss difference)."""
        beta2, eps = float(o["betas"][1]), float(o["eps"])
        # below this |g|, fp32((1 - beta2) g^2) is at most half float16's smallest subnormal 2^-24
        small = math.sqrt(2.0 ** -25 / (1.0 - beta2))
        self._warn_once(
            "fp16_v",
            f"{type(self).__name__}: Adam's v (exp_avg_sq) is float16, as the float16 parameters are "
            f"(state_dtype='param'); there (1 - beta2) g^2 rounds to 0 for |g| below {small:.2g} (beta2={beta2:g}) "
            f"while m does not, and such a coordinate moves by up to lr * |g| / eps ({small / eps:.2g} * lr at "
            f"eps={eps:g}) instead of about lr. A zeroth-order estimate is that small on many coordinates, so the "
            "model diverges. Pass state_dtype='float32' (m and v in float32, 8 bytes per parameter; bfloat16 "
            "parameters do not need it for this: bfloat16 has float32's range)")

    def _check_step_scalars(self, g: dict, where: str) -> None:
        # lr=3e38 (finite in float32, as _check_rate asks) made lr / (1 - beta1^1) = 3e39, inf in
        # the kernels' float32: every parameter became inf / nan. Refused before the first kernel
        # call (the update also takes the last perturbation back: a refusal there left theta
        # perturbed), for the step count each bucket's update will take; conserve's moves too.
        o = g       # the step's options are these (step() checked them just now)
        lr, b1 = float(o["lr"]), float(o["betas"][0])
        wd, decoupled = float(o["weight_decay"]), o["decoupled_weight_decay"]
        # the common case, decided without the state: step 1's step size is the largest
        if (not self.conserve and lr / (1.0 - b1) < zfkernels.opspec.F32_MAX / 2
                and (not decoupled or lr * wd < zfkernels.opspec.F32_MAX / 2)):
            return
        steps = sorted({int(self.state[p]["step"]) + 1 if "step" in self.state.get(p, ()) else 1
                        for p in g["params"]})
        for t in steps:
            why = zfkernels.opspec.adam_scalars_refusal(lr, b1, t, wd, decoupled)
            if why is None and self.conserve and lr != 0.0:
                why = _frozen_moves_refusal(lr, wd if decoupled else 0.0, o["betas"], float(o["eps"]), t)
            if why is not None:
                raise ValueError(f"{where}{why}")

    def _move(self, a, b, seeds, d, mask_seed):
        """Conserve: move theta0 + a*Delta -> theta0 + b*Delta along the stored Adam
        direction u = m/(sqrt(v)/sqrt(bc2) + eps), m and v frozen (see _frozen_adam_move)."""
        for g in self._groups():
            o = self._opts(g)
            lr = float(o["lr"])
            if lr == 0.0:
                continue
            wd = float(o["weight_decay"]) if o["decoupled_weight_decay"] else 0.0
            dist, _ = self._stream(g)
            for ps, ids, be in self._buckets(g):
                sts = self._states(ps)
                lr_f, wd_f, eps_f = _frozen_adam_move(a, b, lr=lr, wd=wd, betas=o["betas"], eps=o["eps"],
                                                      step=int(sts[0]["step"]))
                zfkernels.call_op(
                    be, "zo_adam_update_", params=ps, exp_avgs=[st["exp_avg"] for st in sts],
                    exp_avg_sqs=[st["exp_avg_sq"] for st in sts], tensor_ids=ids, seeds=[], coeffs=[],
                    dist=dist, lr=lr_f, beta1=_FROZEN_BETA, beta2=_FROZEN_BETA, eps=eps_f, weight_decay=wd_f,
                    decoupled_weight_decay=True, step=1, stochastic_rounding=o["stochastic_rounding"],
                    round_seed=self._round_seed(o))


@contextlib.contextmanager
def _hooks_held(opt: torch.optim.Optimizer, kind: str):
    """torch.optim's ``kind`` ("state_dict" / "load_state_dict") pre- and post-hooks held back
    (torch.optim's own method runs without them); yields them. The same dicts come back
    after: the hooks' RemovableHandles refer to them."""
    pre, post = f"_optimizer_{kind}_pre_hooks", f"_optimizer_{kind}_post_hooks"
    held = getattr(opt, pre), getattr(opt, post)
    setattr(opt, pre, {})
    setattr(opt, post, {})
    try:
        yield held
    finally:
        setattr(opt, pre, held[0])
        setattr(opt, post, held[1])


def state_dict_with_hooks(opt: torch.optim.Optimizer, build: Callable) -> dict:
    """``build()`` (torch.optim's state_dict plus zeroflow's parts) inside torch.optim's hook
    order: the post-hooks see, and may replace, the whole dict, zeroflow's parts included."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    with _hooks_held(opt, "state_dict") as (_, post):
        sd = build()
    for hook in post.values():
        out = hook(opt, sd)
        sd = sd if out is None else out
    return sd


def load_with_hooks(opt: torch.optim.Optimizer, state_dict, load: Callable) -> None:
    """``load(state_dict)`` inside torch.optim's hook order: the pre-hooks first (they may
    adapt or replace the dict, so the zeroflow checks in ``load`` see what the hooks made),
    the post-hooks last (they see the counters and inner optimizers that ``load`` restores
    after torch.optim's own load)."""
    if isinstance(state_dict, dict):       # anything else: load's check names it
        state_dict = state_dict.copy()     # torch.optim's shallow copy: a hook may edit it
        for hook in opt._optimizer_load_state_dict_pre_hooks.values():
            out = hook(opt, state_dict)
            state_dict = state_dict if out is None else out
    with _hooks_held(opt, "load_state_dict") as (_, post):
        load(state_dict)
    for hook in post.values():
        hook(opt)


def _check_layout(state_dict: dict) -> None:
    """A state_dict's ``param_groups`` (a list of dicts, each listing its parameter ids, every
    id once) and ``state`` (id -> dict of buffers, for listed ids only): a ValueError naming
    what is wrong, where torch.optim's load raised an AttributeError / TypeError, or the shape
    check named "the parameter None" for an id of no group."""
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not (isinstance(groups, (list, tuple))
            and all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups)):
        raise ValueError(f"state_dict's param_groups must be a list of dicts, each with a 'params' list of parameter "
                         f"ids (got {repr(groups)[:80]}); was it saved by optimizer.state_dict()?")
    if not isinstance(state, dict):
        raise ValueError(f"state_dict's state must map parameter ids to dicts of buffers (got {type(state).__name__}); "
                         "was it saved by optimizer.state_dict()?")
    for pid, st in state.items():
        if not isinstance(st, dict):
            raise ValueError(f"state_dict's state of parameter {pid!r} is {type(st).__name__}, not a dict of buffers "
                             "(name -> tensor)")
    ids = [pid for g in groups for pid in g["params"]]
    seen: set = set()
    twice = [pid for pid in ids if pid in seen or seen.add(pid)]
    if twice:
        raise ValueError(f"state_dict's param_groups list parameter id {twice[0]!r} more than once; every "
                         "parameter has one id (a state edited by hand?)")
    unknown = [pid for pid in state if pid not in seen]
    if unknown:
        raise ValueError(f"state_dict's state holds parameter id(s) {', '.join(map(repr, unknown[:5]))} that no "
                         "param group lists (a state edited by hand, or the groups of another state?)")


# The per-parameter buffers of a first-order state that hold their parameter's shape: SGD's
# momentum, Adam's (AdamW's, NAdam's, RAdam's) m, v and max v. Only these: other optimizers a
# hybrid's FO phase may be keep other tensors of other shapes (NAdam's mu_product and ASGD's eta
# and mu are 0-dim, Adafactor's row_var and col_var factored), whose states were refused.
PARAM_SHAPED_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_buffer_shapes(state_dict: dict, param_groups, what: str = "state_dict's") -> None:
    """A first-order state's buffers (:data:`PARAM_SHAPED_BUFFERS`: SGD's momentum, Adam's m,
    v and max v) each of its parameter's shape, else a ValueError naming it. torch.optim's
    load takes them as they are and its next step failed on the size, after the load had
    replaced the optimizer's state and options (and, in a hybrid, those of both phases).
    ``state_dict``: checked by :func:`_check_layout`, with as many groups and parameters per
    group as ``param_groups``."""
    shapes = {pid: tuple(p.shape) for sg, g in zip(state_dict["param_groups"], param_groups)
              for pid, p in zip(sg["params"], g["params"])}
    for pid, st in state_dict["state"].items():
        for name, buf in st.items():
            if name in PARAM_SHAPED_BUFFERS and isinstance(buf, torch.Tensor) and tuple(buf.shape) != shapes.get(pid):
                raise ValueError(f"{what} {name} of parameter {pid} has shape {tuple(buf.shape)}, the parameter "
                                 f"{shapes.get(pid)} (a state of another model?)")


def _check_tensor_ids(c: dict, groups) -> None:
    """A state's tensor ids (its "zeroflow" part, absent from states saved before they were)."""
    if "tensor_ids" in c:
        check_tensor_ids(c["tensor_ids"], c.get("next_tensor_id"), sum(len(g["params"]) for g in groups),
                         "state_dict's 'zeroflow'")


def check_tensor_ids(ids, next_id, n: int, where: str) -> None:
    """ValueError unless ``ids`` are the tensor ids of ``n`` parameters: one each, distinct, in
    [0, 2^32) (the stream's range, docs/perturbation-stream.md), and ``next_id`` (the next id to
    give) above them all. ``where`` names what holds them: a saved state, or a trajectory log's
    header (replay.py reads them with this one rule)."""
    if not isinstance(ids, (list, tuple)) or len(ids) != n:
        raise ValueError(f"{where} tensor_ids must list one id per parameter ({n}), got {repr(ids)[:80]}")
    ids = [counter(t, f"{where} tensor id", limit=TENSOR_ID_LIMIT) for t in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where} tensor_ids give one id to two parameters")
    nxt = counter(next_id, f"{where} next_tensor_id")
    if ids and nxt <= max(ids):
        raise ValueError(f"{where} next_tensor_id is {nxt}, not above its tensor ids (up to {max(ids)})")


def counter(x, what: str, limit: int | None = None) -> int:
    """``x`` as a counter (an int >= 0, below ``limit``), else a ValueError naming ``what``.
    A bool is not a count (operator.index takes True as 1): the ops' rule, zfkernels.stream._is_bool."""
    try:
        if _is_bool(x):
            raise TypeError
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{what} is {x!r}; it must be an int >= 0") from None
    if v < 0 or (limit is not None and v >= limit):
        raise ValueError(f"{what} is {v}; it must be an int >= 0" + (f" and below {limit}" if limit else ""))
    return v


# The kernels compute in float32: a Python float from _F32_OVERFLOW up is inf there, so an
# option finite as a float64 (lr=1e39) wrote +-inf into every parameter at the first step, as
# inf itself did.
_IN_F32 = (f" in float32 (at most {torch.finfo(torch.float32).max:.8g}, float32's largest number: the kernels "
           "compute in float32, where a larger value is inf)")


def _check_rate(g: dict, name: str) -> None:
    """Option ``name`` of group ``g`` (lr, weight_decay, momentum): >= 0 and finite in float32."""
    v = _number(g[name], name)
    if not 0.0 <= v < _F32_OVERFLOW:
        raise ValueError(f"{name}={g[name]} must be >= 0 and finite{_IN_F32 if _F32_OVERFLOW <= v < math.inf else ''}")


def _number(x, name: str) -> float:
    """Option ``name``'s value ``x`` as a float for a range check; TypeError naming it for what
    is not a real number (None, a string, a bool, a tensor of several elements): the ops' own
    rule (zfkernels._real), so an option and the op argument it becomes accept the same values."""
    return zfkernels._real(x, name)


_ONCE = "model.parameters() and model.named_parameters() list a tied tensor once"


def _which(k: int, name: str | None) -> str:
    """Parameter ``k`` of a group, with its name where the group was given names."""
    return f"parameter {k} ({name!r})" if name else f"parameter {k}"


def refuse_a_parameter_given_twice(items, group: int) -> None:
    """ValueError for one tensor listed twice in a group (``items``: tensors or (name, tensor)
    pairs), the first-order optimizers' check: torch.optim only warns there and updates the tensor
    twice a step (a tied weight from named_parameters(remove_duplicate=False) at twice its lr). The
    ZO optimizers refuse it with any memory overlap (_check_params)."""
    seen: dict = {}
    for k, item in enumerate(items):
        name, t = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
        if id(t) in seen:
            j, other = seen[id(t)]
            raise ValueError(f"{_which(k, name)} of param group {group} is {_which(j, other)} (one tensor given twice, "
                             "e.g. a tied weight such as a language model's lm_head and input embedding with "
                             "tie_word_embeddings, listed under both names by named_parameters(remove_duplicate=False))"
                             ": torch.optim only warns, and updates it twice a step; pass every parameter once "
                             f"({_ONCE})")
        seen[id(t)] = (k, name)


def refuse_a_shared_parameter(param_groups: list, items: list) -> None:
    """torch.optim's refusal of a tensor already in another group ("some parameters appear in more
    than one parameter group"), naming the two places: the usual one is a tied weight (an LM's
    lm_head and input embedding, tie_word_embeddings) listed under both names by
    named_parameters(remove_duplicate=False), the names then in two groups of the no-decay
    recipe. ``items``: the new group's, as given (tensors or (name, tensor) pairs); the ZO and the
    first-order optimizers' check."""
    if not param_groups:
        return
    held = {}
    for i, g in enumerate(param_groups):
        names = g.get("param_names")
        for k, p in enumerate(g["params"]):
            held.setdefault(id(p), (i, k, names[k] if names else None))
    for k, item in enumerate(items):
        name, t = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
        if id(t) in held:
            i, j, other = held[id(t)]
            raise ValueError(
                f"some parameters appear in more than one parameter group: {_which(k, name)} of the new param "
                f"group {len(param_groups)} is {_which(j, other)} of param group {i} (a tied weight, e.g. a "
                "language model's lm_head and input embedding with tie_word_embeddings, listed under both names by "
                "named_parameters(remove_duplicate=False)?); a tensor is trained with the options of one group: "
                f"put it in one ({_ONCE})")


def refuse_a_module(params, what: str = "params") -> None:
    """TypeError for a ``torch.nn.Module`` given where its parameters belong
    (``create("zo_sgd", model)``): torch.optim said only "'LlamaForCausalLM' object is not
    iterable", naming neither the argument nor the fix. Not a ``torch.nn.ParameterList``, an
    iterable of its Parameters that torch.optim takes as given."""
    if isinstance(params, torch.nn.Module) and not isinstance(params, torch.nn.ParameterList):
        raise TypeError(f"{what} is a {type(params).__name__} (a torch.nn.Module), not an iterable of Tensors or "
                        "dicts: give the optimizer the module's parameters, model.parameters() (or "
                        "model.named_parameters(), for named groups)")


def params_list(ps) -> list:
    """A param group's ``params`` (a tensor, or an iterable of tensors or (name, tensor)
    pairs) as a list; TypeError for a set, before list() would hide it from torch.optim's
    own check: the order of its tensors, which decides each one's z and state, changes
    between runs. TypeError for a module (:func:`refuse_a_module`)."""
    refuse_a_module(ps, "param_group['params']")
    if isinstance(ps, (set, frozenset)):
        raise TypeError("param_group['params'] is a set: the order of its tensors (which decides each one's z and "
                        "state) changes between runs; give a list (e.g. list(model.parameters()))")
    return [ps] if isinstance(ps, torch.Tensor) else list(ps)


def _shadows_a_method(obj, name: str) -> bool:
    """Whether instance attribute ``name`` replaces a method of ``obj``'s class (an lr
    scheduler's ``step`` wrapper, a monkeypatch): it is bound to this instance."""
    return callable(getattr(type(obj), name, None)) and not isinstance(getattr(type(obj), name), property)


def _options_of(g: dict) -> dict:
    return {k: v for k, v in g.items() if k not in ("params", "param_names")}


def _with_added_options(groups):
    """Saved param groups completed with the options added since (ADDED_GROUP_OPTIONS)."""
    return [{**ADDED_GROUP_OPTIONS, **g} if isinstance(g, dict) else g for g in groups]


# the moves ZOFusedAdam's conserve makes (_conserve): (a, b) of theta0 + a*Delta -> theta0 + b*Delta
_CONSERVE_MOVES = ((1.0, -1.0), (1.0, 0.0), (-1.0, 0.0), (-1.0, 1.0))


def _frozen_moves_refusal(lr: float, wd: float, betas, eps: float, step: int):
    """Why one of conserve's frozen Adam moves after Adam step ``step`` would take a scalar that
    is infinite in float32 (its lr, eps, step size or decay factor: the move scales the step
    size by up to 2 sqrt(1 - beta2^step) / 2^-13.5), or None. Raised mid-step it would leave
    theta at theta0 + Delta; checked before the step."""
    for a, b in _CONSERVE_MOVES:
        try:
            lr_f, wd_f, eps_f = _frozen_adam_move(a, b, lr=lr, wd=wd, betas=betas, eps=eps, step=step)
        except ZeroDivisionError:       # 1 + a lr wd = 0: the ZeroDivisionError came mid-step, theta moved
            return (f"lr={lr:g} and weight_decay={wd:g} make AdamW's decay factor 1 - lr * weight_decay 0: the update "
                    f"multiplies every parameter by 0, and conserve's move back from theta0 - Delta divides by that "
                    f"factor; give lr * weight_decay other than 1, or conserve=False")
        why = zfkernels.opspec.adam_scalars_refusal(lr_f, _FROZEN_BETA, 1, wd_f, True)
        big = max(abs(lr_f), abs(eps_f)) >= _F32_OVERFLOW
        if why is not None or big:
            return (f"lr={lr:g} (betas={tuple(betas)}, eps={eps:g}, weight_decay={wd:g}) is too large for conserve at "
                    f"Adam step {step}: its move from theta0 {a:+g} Delta to theta0 {b:+g} Delta takes a step size or "
                    f"eps that is infinite in float32, where the kernels compute, and would write inf / nan into "
                    f"every parameter; give a smaller lr (or eps), or conserve=False")
    return None


def _frozen_adam_move(a: float, b: float, *, lr: float, wd: float, betas, eps: float, step: int):
    """``(lr', wd', eps')`` of the frozen AdamW call that moves theta0 + a*Delta to
    theta0 + b*Delta, Delta being the last update (lr, decoupled ``wd`` or 0 for Adam's L2,
    ``betas``, ``eps``, Adam step ``step``). Derivation: docs/algorithms.md, §2 "The frozen
    Adam move"."""
    b1, b2, eps = float(betas[0]), float(betas[1]), float(eps)   # a float32 tensor/numpy option: float64 math
    s = lr / (1.0 - b1 ** step)                                     # the update's step size lr/bc1
    kappa = math.sqrt(1.0 - b2 ** step) / math.sqrt(_FROZEN_BC)     # sigma / sqrt(bc')
    f = (1.0 + b * lr * wd) / (1.0 + a * lr * wd)                   # decay the op must apply
    lr_f = s * (a * f - b) * _FROZEN_BC * kappa
    wd_f = (1.0 - f) / lr_f if (lr_f != 0.0 and wd) else 0.0
    return lr_f, wd_f, eps * kappa
