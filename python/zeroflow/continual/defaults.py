"""Default configurations per dataset and method (mirrored by configs/*.yaml).

Precedence: these defaults < ``--config FILE`` < explicit command-line flags.
``lr`` may be a number or ``{sgd: .., zo_sgd: .., adam: ..}``, picked by the optimizer
(``lr_family``): ``adam`` for the Adam family and for ``zo_sgd_sign`` (a sign step moves every
coordinate by about lr, like an Adam step, so the SGD rates are 10x too large for it);
``zo_sgd`` for zo_sgd, zo_sgd_conserve and forward_grad (their one-query estimate is about
sqrt(d) times as long as the gradient, so the first-order rates are far too large for them:
the reference ZO code ran ZO-SGD at 1e-4) and, where a mapping has no ``zo_sgd`` entry, the
``sgd`` entry; ``sgd`` for fo_sgd. With ``--hybrid-switch``, ``lr`` is the first-order phase's
rate (the FO twin's entry: ``sgd``, or ``adam`` for the Adam family) and ``hybrid_zo_lr`` the
zeroth-order phase's (the ZO method's own entry, unless given).

``validate`` checks every option's type and range and names the option as the user gave it
(``--lr``, or ``lr in FILE``), so that a run that cannot start fails before it writes anything.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Dict, Optional, Tuple

from .errors import ZeroflowError, the_same_on_every_rank

METHODS = ("ease", "aper")
DATASETS = ("digits", "cifar100", "cub", "imagenet-a", "omnibenchmark")
# the datasets whose number of classes is fixed (the others count their class folders when loaded)
FIXED_CLASSES = {"digits": 10, "cifar100": 100}
OPTIMIZERS = ("zo_sgd", "zo_sgd_sign", "zo_sgd_conserve", "zo_adam", "zo_adam_sign", "zo_adam_conserve",
              "forward_grad", "fo_sgd", "fo_adam")
PERTURBATIONS = ("gaussian", "rademacher")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")      # precision.PRECISIONS (this module imports no torch)
BASELINES = ("untrained", "none")
# the datasets --download fetches (digits ships with scikit-learn; the folder datasets are placed by hand)
DOWNLOADABLE = ("digits", "cifar100")
# Optimizers whose steps a trajectory log can replay (--record): the ZO methods whose steps are
# determined by loss scalars (forward_grad's jvps and first-order steps are not).
RECORDABLE = ("zo_sgd", "zo_sgd_sign", "zo_sgd_conserve", "zo_adam", "zo_adam_sign", "zo_adam_conserve")

COMMON: Dict[str, Any] = dict(
    method="ease", optimizer="zo_adam", dataset="digits", data_root="data", download=False,
    seed=1993, device="auto", backend=None, checkpoint=None,
    weight_decay=5e-4, momentum=0.9, schedule="cosine",
    q=1, zo_eps=1e-3, perturbation="gaussian", sparsity=0.0, history=0.0, hybrid_switch=None, hybrid_zo_lr=None,
    ease_alpha=0.1, num_workers=0, eval_batch_size=256, threads=None, record=False,
    precision="fp32", class_order_seed=1993, baseline="none",
    # EASE variants (PILOT's option names after the prefix): the per-task variant of the EASE
    # repository's CIFAR / CUB / ImageNet-A configs; OmniBenchmark's published one differs
    ease_use_init_ptm=False, ease_beta=0.0, ease_moni_adam=False, ease_adapter_num=None,
    ease_recalc_sim=True, ease_use_reweight=True, ease_later_lr=None, ease_later_epochs=None,
)

# Real data: ViT-B/16-IN21K, reference hyperparameters (continual-reference.md): fo_sgd the
# learners' own SGD rates, the ZO SGD family and the Adam family the reference ZO code's rates
# (zo-reference.md: SGD 1e-4, Adam 1e-3), OmniBenchmark EASE the published config.
_VIT = dict(backbone="vit_base_patch16_224.augreg_in21k", adapter_dim=64, img_size=224, num_workers=4,
            eval_batch_size=128)
# The small ViT's pretraining (backbone: small): the digits defaults, and those of a real
# dataset run on the small ViT (``backbone: small`` in a config file, e.g. a quick test on the
# data's own format), which :func:`validate` fills in where the file gives none.
SMALL_PRETRAINING: Dict[str, Any] = dict(pretrain_epochs=30, pretrain_lr=3e-3, pretrain_batch_size=64)
DATASET_DEFAULTS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "digits": {
        "_": dict(backbone="small", adapter_dim=16, init_cls=2, increment=2, epochs=10, batch_size=32,
                  lr={"sgd": 0.05, "adam": 0.005}, weight_decay=0.0,
                  **SMALL_PRETRAINING,
                  baseline="untrained"),     # on the toy the untrained adapters score as well: show the gain
    },
    "cifar100": {
        "_": dict(_VIT, init_cls=10, increment=10, epochs=20),
        "ease": dict(lr={"sgd": 0.025, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=48),
        "aper": dict(lr={"sgd": 0.01, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=48),
    },
    "cub": {
        "_": dict(_VIT, init_cls=20, increment=20, epochs=20),
        "ease": dict(lr={"sgd": 0.008, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=32, ease_alpha=0.05),
        "aper": dict(lr={"sgd": 0.01, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=48),
    },
    "imagenet-a": {
        "_": dict(_VIT, init_cls=20, increment=20, epochs=20),
        "ease": dict(lr={"sgd": 0.05, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=32, weight_decay=5e-3),
        "aper": dict(lr={"sgd": 0.01, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=48),
    },
    "omnibenchmark": {
        "_": dict(_VIT, init_cls=30, increment=30, epochs=20),
        # the published OmniBenchmark config (EASE repository exps/ease_omni_in21k.json): only the
        # first task trains an adapter, the PTM's own features are a subspace, plain cosine fc
        "ease": dict(lr={"sgd": 0.01, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=16, ease_alpha=1.0,
                     ease_use_init_ptm=True, ease_beta=1.0, ease_moni_adam=True, ease_adapter_num=1),
        "aper": dict(lr={"sgd": 0.01, "zo_sgd": 1e-4, "adam": 1e-3}, batch_size=48),
    },
}

# The embedded default's small ViT (timm VisionTransformer options; ``small_vit`` in a config
# file overrides some of them). The digits images are 8x8.
SMALL_VIT: Dict[str, Any] = dict(patch_size=2, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
DIGITS_IMG_SIZE = 8

KNOWN_KEYS = set(COMMON) | {"backbone", "adapter_dim", "img_size", "init_cls", "increment", "epochs",
                            "batch_size", "lr", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size",
                            "small_vit", "model_kwargs"}

# ---------------------------------------------------------------- option types and ranges
CHOICES = {"method": METHODS, "optimizer": OPTIMIZERS, "dataset": DATASETS, "perturbation": PERTURBATIONS,
           "schedule": SCHEDULES, "precision": PRECISIONS, "baseline": BASELINES}
# integer options: smallest allowed value (and the largest, for the seed)
INTS = {"epochs": 0, "batch_size": 1, "q": 1, "init_cls": 1, "increment": 1, "seed": 0, "num_workers": 0,
        "eval_batch_size": 1, "threads": 1, "hybrid_switch": 0, "adapter_dim": 1, "img_size": 1,
        "pretrain_epochs": 0, "pretrain_batch_size": 1, "class_order_seed": 0, "ease_adapter_num": 1,
        "ease_later_epochs": 0}
SEEDS = ("seed", "class_order_seed")      # integers in [0, SEED_MAX]
SEED_MAX = 2 ** 31 - 1
# real options: (low, low included, high or None, high included)
FLOATS = {"lr": (0.0, True, None, False), "weight_decay": (0.0, True, None, False),
          "momentum": (0.0, True, 1.0, False), "zo_eps": (0.0, False, None, False),
          "sparsity": (0.0, True, 1.0, False), "history": (0.0, True, 1.0, False),
          "ease_alpha": (0.0, True, None, False), "pretrain_lr": (0.0, False, None, False),
          "ease_beta": (0.0, True, None, False), "ease_later_lr": (0.0, True, None, False),
          "hybrid_zo_lr": (0.0, True, None, False)}
STRINGS = ("data_root", "device", "backbone")
BOOLS = ("download", "record", "ease_use_init_ptm", "ease_moni_adam", "ease_recalc_sim", "ease_use_reweight")
# may be null (None): the option is off / chosen automatically
NULLABLE = {"threads", "hybrid_switch", "hybrid_zo_lr", "backend", "checkpoint", "small_vit", "model_kwargs",
            "ease_adapter_num", "ease_later_lr", "ease_later_epochs"}


def check_choice(kind: str, value: str, valid) -> str:
    if value not in valid:
        raise ZeroflowError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def _choice(kind: str, value, valid, given: Optional[str]):
    """:func:`check_choice`, naming where a value from a config file came from (``given``:
    ``"precision in FILE"``); a flag's value is named by the flag's own error as before."""
    try:
        return check_choice(kind, value, valid)
    except ZeroflowError as e:
        if given and not given.startswith("--"):
            raise ZeroflowError(f"{given}: {e}") from None
        raise


# options without a command-line flag (set in a --config file)
CONFIG_ONLY = ("schedule", "eval_batch_size", "backbone", "adapter_dim", "img_size", "pretrain_epochs", "pretrain_lr",
               "pretrain_batch_size", "small_vit", "model_kwargs")


def flag(key: str) -> str:
    """How the user sets ``key``: its flag, or the config-file option."""
    return f"config option {key}" if key in CONFIG_ONLY else "--" + key.replace("_", "-")


LR_KEYS = ("sgd", "zo_sgd", "adam")
ZO_SGD_FAMILY = ("zo_sgd", "zo_sgd_conserve", "forward_grad")


def lr_family(optimizer: str, hybrid: bool = False) -> str:
    """Which entry of an ``lr: {sgd: .., zo_sgd: .., adam: ..}`` mapping ``optimizer`` uses
    (module docstring; ``zo_sgd`` falls back to ``sgd`` in a mapping without it). ``hybrid``
    (``--hybrid-switch``): ``lr`` is the rate of the first-order phase, so the SGD family
    (zo_sgd_sign included: its FO twin is fo_sgd) takes the ``sgd`` entry there; the ZO phase
    steps at ``hybrid_zo_lr``, the entry of ``lr_family(optimizer)`` (see ``validate``)."""
    if "adam" in optimizer or (optimizer == "zo_sgd_sign" and not hybrid):
        return "adam"
    return "zo_sgd" if optimizer in ZO_SGD_FAMILY and not hybrid else "sgd"


def _lr_key(lr: dict, optimizer: str, hybrid: bool) -> str:
    """The key of the mapping ``lr`` that ``optimizer`` reads (``zo_sgd``'s fallback applied)."""
    family = lr_family(optimizer, hybrid)
    return "sgd" if family == "zo_sgd" and family not in lr else family


def lr_entry(lr: dict, optimizer: str, hybrid: bool = False):
    """The entry of the mapping ``lr`` that ``optimizer`` uses; ``None`` if it has none."""
    return lr.get(_lr_key(lr, optimizer, hybrid))


def _range_text(lo, lo_in, hi, hi_in) -> str:
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _as_int(name: str, v, lo: int, hi: Optional[int]) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    elif isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            pass
    if not isinstance(v, int) or isinstance(v, bool):
        raise ZeroflowError(f"{name} must be an integer (got {v!r})")
    if v < lo or (hi is not None and v > hi):
        raise ZeroflowError(f"{name} must be {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'} (got {v})")
    return v


def _as_float(name: str, v, lo, lo_in, hi, hi_in) -> float:
    if isinstance(v, str):            # YAML reads 1e-3 (no dot) as a string
        try:
            v = float(v.strip())
        except ValueError:
            pass
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ZeroflowError(f"{name} must be a number (got {v!r})")
    v = float(v)
    ok = (v >= lo if lo_in else v > lo) and (hi is None or (v <= hi if hi_in else v < hi))
    if not ok:
        raise ZeroflowError(f"{name} must be {_range_text(lo, lo_in, hi, hi_in)} (got {v:g})")
    return v


def _pick_lr(lr, optimizer: str, name: str, hybrid: bool = False):
    """A number, or the entry of an ``{sgd: .., zo_sgd: .., adam: ..}`` mapping that ``optimizer`` uses."""
    if not isinstance(lr, dict):
        return lr
    unknown = sorted(set(lr) - set(LR_KEYS))
    if unknown:
        raise ZeroflowError(f"{name}: unknown key(s) {', '.join(map(str, unknown))}; an lr mapping has the keys "
                            f"sgd, zo_sgd (optional: sgd's rate when absent) and adam")
    key = _lr_key(lr, optimizer, hybrid)
    if lr.get(key) is None:
        raise ZeroflowError(f"{name} has no {key!r} entry, which --optimizer {optimizer} uses; give "
                            f"lr: {{sgd: .., zo_sgd: .., adam: ..}} or a single number")
    return lr[key]


def validate(cfg: Dict[str, Any], names: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """A checked copy of a full run configuration: every option has its type (numbers given
    as strings are converted) and its range, ``lr`` is a number. ``names[key]``: how the
    user gave the option (default ``--key``), used in the error message."""
    names = names or {}

    def name(k):
        return names.get(k, flag(k))

    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ZeroflowError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(KNOWN_KEYS))}")
    out = {k: v for k, v in COMMON.items() if k not in cfg} | dict(cfg)   # options added since a run was saved
    if out.get("backbone") == "small":
        # a real dataset's defaults have no pretraining options (its backbone is a timm ViT): a
        # run of it on the small ViT stopped with KeyError: 'pretrain_lr' after its data was read
        out = {k: v for k, v in SMALL_PRETRAINING.items() if k not in out} | out
    required = set.intersection(*(set(defaults_for(d, m)) for d in DATASETS for m in METHODS))
    missing = sorted(required - set(out))
    if missing:
        raise ZeroflowError(f"the configuration lacks {', '.join(missing)}")
    for k, valid in CHOICES.items():
        out[k] = _choice(k, out[k].lower() if isinstance(out[k], str) else out[k], valid, names.get(k))
    for k, lo in INTS.items():
        if k in out and not (out[k] is None and k in NULLABLE):
            out[k] = _as_int(name(k), out[k], lo, SEED_MAX if k in SEEDS else None)
    n_classes = FIXED_CLASSES.get(out["dataset"])
    if n_classes is not None and out["init_cls"] > n_classes:
        raise ZeroflowError(init_cls_refusal(name("init_cls"), out["init_cls"], n_classes, out["dataset"]))
    hybrid = bool(out.get("hybrid_switch")) and not out["optimizer"].startswith("fo_")
    if out.get("hybrid_zo_lr") is not None and not out.get("hybrid_switch"):
        raise ZeroflowError(f"{name('hybrid_zo_lr')} is the lr of a hybrid run's zeroth-order phase; this run has no "
                            f"--hybrid-switch (drop the option, or give --hybrid-switch N)")
    if hybrid and out.get("hybrid_zo_lr") is None and isinstance(out["lr"], dict):
        # the ZO phase's rate: the ZO method's own entry (ZO-SGD's 1e-4 on real data, not the
        # first-order phase's 0.025, which makes its one-query steps ~sqrt(d) times too long)
        out["hybrid_zo_lr"] = _pick_lr(out["lr"], out["optimizer"], name("lr"))
    out["lr"] = _pick_lr(out["lr"], out["optimizer"], name("lr"), hybrid=bool(out.get("hybrid_switch")))
    for k, bounds in FLOATS.items():
        if k in out and not (out[k] is None and k in NULLABLE):
            out[k] = _as_float(name(k), out[k], *bounds)
    if hybrid and out["lr"] == 0 and out.get("hybrid_zo_lr"):
        raise ZeroflowError(f"{name('lr')} is 0 and {name('hybrid_zo_lr')} {out['hybrid_zo_lr']:g}: a hybrid run "
                            "schedules its ZO phase's lr as a multiple of the first-order phase's (--lr), which 0 "
                            "cannot carry; give --lr > 0")
    for k in STRINGS + ("backend", "checkpoint"):
        if k in out and not (out[k] is None and k in NULLABLE) and not isinstance(out[k], str):
            raise ZeroflowError(f"{name(k)} must be a string (got {out[k]!r})")
    if out["dataset"] == "digits" and out["backbone"] != "small":
        # a timm ViT takes 3-channel images of img_size: the digits loader's 8x8 grey ones stopped
        # it with KeyError: 'img_size', or an AssertionError after the run folder was written
        raise ZeroflowError(f"{name('backbone')} ({out['backbone']}): the digits images (8x8, grey) run on the small "
                            f"ViT only (backbone: small, pretrained by zeroflow); drop the option, or run the timm ViT "
                            f"on a real dataset")
    for k in ("data_root", "checkpoint"):     # a config file's ~/data (no shell expands it)
        if isinstance(out.get(k), str):
            out[k] = os.path.expanduser(out[k])
    for k in BOOLS:
        if not isinstance(out[k], bool):
            raise ZeroflowError(f"{name(k)} must be true or false (got {out[k]!r})")
    if out["download"] and out["dataset"] not in DOWNLOADABLE:
        # the loader's refusal named no option ('cub cannot be downloaded automatically'); digits
        # ships with scikit-learn, which resolve says in a warning
        raise ZeroflowError(f"{name('download')}: {out['dataset']} cannot be downloaded automatically; place it under "
                            f"{os.path.join(out['data_root'], out['dataset'])}/{{train,test}}/<class>/<image> and "
                            f"drop the option")
    for k in ("small_vit", "model_kwargs"):
        if out.get(k) is not None and not isinstance(out[k], dict):
            raise ZeroflowError(f"{name(k)} must be a mapping of option: value (got {out[k]!r})")
    if out.get("small_vit") is not None:
        out["small_vit"] = check_small_vit(out["small_vit"], out, name("small_vit"))
    if out.get("model_kwargs") is not None and out["backbone"] == "small":
        raise ZeroflowError(f"{name('model_kwargs')} sets the timm ViT backbone of the real datasets; the "
                            f"{out['dataset']} runs use the small ViT that zeroflow pretrains itself (set small_vit "
                            f"instead)")
    if out.get("small_vit") is not None and out["backbone"] != "small":
        raise ZeroflowError(f"{name('small_vit')} sets the small ViT of the digits runs; this run's backbone is "
                            f"{out['backbone']} (set model_kwargs instead)")
    if "num_classes" in (out.get("model_kwargs") or {}):
        raise ZeroflowError(f"{name('model_kwargs')}: num_classes is zeroflow's (the backbone gives features, "
                            f"num_classes 0; the learners add their own heads): drop it")
    if out.get("checkpoint") and out["backbone"] == "small":
        raise ZeroflowError(f"{name('checkpoint')} is for the ViT backbone of the real datasets; the {out['dataset']} "
                            f"runs use the small ViT that zeroflow pretrains itself (drop the option)")
    if out["record"] and (out["optimizer"] not in RECORDABLE or out.get("hybrid_switch")):
        raise ZeroflowError(
            f"{name('record')}: the steps of {out['optimizer']}"
            f"{' with --hybrid-switch' if out.get('hybrid_switch') else ''} cannot be replayed from a trajectory log "
            f"(first-order steps and forward_grad's jvps are not determined by loss scalars); record a zo_* "
            f"optimizer without --hybrid-switch")
    check_ease_variant(out, name)
    return out


def check_small_vit(given: Dict, cfg: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``small_vit`` (the options of ``SMALL_VIT`` it overrides), checked as the other options
    are, with what timm's VisionTransformer and the pretraining need: heads that split
    ``embed_dim`` evenly, patches that tile the image. ``name``: how the user gave it."""
    unknown = sorted(map(str, set(given) - set(SMALL_VIT)))
    if unknown:
        raise ZeroflowError(f"{name}: unknown key(s) {', '.join(unknown)}; small_vit may set "
                            f"{', '.join(SMALL_VIT)}")
    out = {}
    for k, v in given.items():
        if k == "mlp_ratio":
            out[k] = _as_float(f"{name}: mlp_ratio", v, 0.0, False, None, False)
        else:
            out[k] = _as_int(f"{name}: {k}", v, 1, None)
    c = SMALL_VIT | out
    if c["embed_dim"] % c["num_heads"]:
        raise ZeroflowError(f"{name}: embed_dim {c['embed_dim']} is not divisible by num_heads {c['num_heads']} "
                            f"(every attention head takes embed_dim / num_heads dimensions)")
    size = DIGITS_IMG_SIZE if cfg["dataset"] == "digits" else cfg["img_size"]
    if size % c["patch_size"]:
        raise ZeroflowError(f"{name}: patch_size {c['patch_size']} does not tile the {size}x{size} images of "
                            f"{cfg['dataset']} (it must divide {size})")
    return out


EASE_KEYS = ("ease_alpha", "ease_use_init_ptm", "ease_beta", "ease_moni_adam", "ease_adapter_num", "ease_recalc_sim",
             "ease_use_reweight", "ease_later_lr", "ease_later_epochs")


def check_ease_variant(cfg: Dict[str, Any], name) -> None:
    """The EASE options must describe a variant PILOT's EASE runs. An option given where it can
    never act (an EASE option of an APER run, ``ease_later_*`` on equal tasks, whose defaults
    never set them) is an error naming why. Options that a dataset's defaults carry and another
    choice idles (``ease_adapter_num`` / ``ease_beta`` after ``--ease-moni-adam false`` /
    ``--ease-use-init-ptm false`` on OmniBenchmark; ``ease_alpha`` under the plain cosine fc) are
    not, as in PILOT: the run's first log line (``EASE.describe``) names the ones that do not act.
    ``name(key)``: how the user gave the option."""
    if cfg["method"] != "ease":
        given = [k for k in EASE_KEYS if canonical_value(cfg.get(k)) != canonical_value(COMMON[k])]
        if given:
            raise ZeroflowError(f"{name(given[0])} is an EASE option; this run is --method {cfg['method']} (drop it)")
        return
    if cfg["ease_moni_adam"]:
        if not cfg["ease_use_init_ptm"]:
            raise ZeroflowError(f"{name('ease_moni_adam')} needs {name('ease_use_init_ptm')} true: PILOT's moni_adam "
                                f"always adds the PTM's own features as a subspace")
        if cfg["ease_adapter_num"] is None:
            raise ZeroflowError(f"{name('ease_moni_adam')} needs {name('ease_adapter_num')}: how many of the first "
                                f"tasks train an adapter (the published OmniBenchmark config: 1)")
    later = [k for k in ("ease_later_lr", "ease_later_epochs") if cfg[k] is not None]
    zero = [k for k in later if cfg[k] == 0]
    if zero:
        raise ZeroflowError(f"{name(zero[0])} is 0, which PILOT reads as unset (its later tasks then train with "
                            f"init_lr / init_epochs) and zeroflow would take literally (later tasks untrained): "
                            f"leave it unset for PILOT's meaning, or give a positive value")
    if later and int(cfg["init_cls"]) == int(cfg["increment"]):
        raise ZeroflowError(f"{name(later[0])} only acts on B-N splits (--init-cls != --increment); with equal "
                            f"tasks PILOT trains every task with --lr / --epochs (drop it)")


def as_given(given: str, value) -> str:
    """An option and its value as the user gave them: a flag or a bare option name with the value
    after it (``--init-cls 6``, ``init_cls 6``), a place in a file with it in parentheses
    (``init_cls in FILE (6)``)."""
    return f"{given} {value}" if given.startswith("--") or " " not in given else f"{given} ({value})"


def init_cls_refusal(given: str, init_cls: int, n_classes: int, dataset: str) -> str:
    """The refusal of an ``init_cls`` above the classes of ``dataset``, the option named as the
    user gave it (``given``: ``--init-cls``, ``init_cls in FILE``): :func:`validate`'s for the
    datasets of a fixed class count, the run's for a folder dataset (counted when it is loaded)."""
    return f"{as_given(given, init_cls)} exceeds the {n_classes} classes of {dataset}; give at most {n_classes}"


def canonical_value(v):
    """Numbers compare by value (1 == 1.0), everything else as it is."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def defaults_for(dataset: str, method: str) -> Dict[str, Any]:
    check_choice("dataset", dataset, DATASETS)
    check_choice("method", method, METHODS)
    d = copy.deepcopy(COMMON)
    d.update(copy.deepcopy(DATASET_DEFAULTS[dataset].get("_", {})))
    d.update(copy.deepcopy(DATASET_DEFAULTS[dataset].get(method, {})))
    d["dataset"], d["method"] = dataset, method
    return d


def _yaml_error(e) -> str:
    """A one-line parse error: where (line, column) and what."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_config_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ZeroflowError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ZeroflowError(f"--config {path}: cannot read it ({e})") from e
    ext = os.path.splitext(path)[1].lower()
    # .yaml / .yml in any case (config.YAML was parsed as JSON: "Expecting value: line 1 column
    # 1"); .json as JSON; any other name as JSON if it is, else as YAML
    kinds = ["yaml"] if ext in (".yaml", ".yml") else ["json"] if ext == ".json" else ["json", "yaml"]
    for kind in kinds:
        try:
            if kind == "yaml":
                import yaml
                data = yaml.safe_load(text)
                data = {} if data is None else data
            else:
                data = json.loads(text)
            break
        except Exception as e:    # yaml.YAMLError, json.JSONDecodeError
            if kind == kinds[-1]:
                raise ZeroflowError(f"--config {path}: cannot parse it{' as YAML' if len(kinds) > 1 else ''}: "
                                    f"{_yaml_error(e)}") from e
    if not isinstance(data, dict):
        raise ZeroflowError(f"--config {path}: expected a mapping of option: value, got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ZeroflowError(f"--config {path}: option names must be strings (got {bad[0]!r})")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ZeroflowError(f"--config {path}: unknown option(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(KNOWN_KEYS))}")
    return data


def carried_over(file_cfg: Dict[str, Any], over: Dict[str, Any], config_file: str) -> Optional[str]:
    """The warning for a config file that names another dataset or method than the flags: the
    flag wins for ``dataset`` / ``method``, but the file's other options still apply, and those
    that are its own dataset's or method's defaults (init_cls, lr, batch_size, the backbone, ...)
    then replace the defaults of the run's. None when the flags name the file's dataset and
    method, or when none of the file's options differs that way."""
    def norm(v):
        return v.lower() if isinstance(v, str) else v

    changed = [k for k in ("dataset", "method") if k in file_cfg and k in over and norm(file_cfg[k]) != norm(over[k])]
    if not changed:
        return None
    try:
        was = defaults_for(norm(file_cfg.get("dataset", over.get("dataset", COMMON["dataset"]))),
                           norm(file_cfg.get("method", over.get("method", COMMON["method"]))))
        now = defaults_for(norm(over.get("dataset", file_cfg.get("dataset", COMMON["dataset"]))),
                           norm(over.get("method", file_cfg.get("method", COMMON["method"]))))
    except ZeroflowError:       # an unknown name: the error that follows says so
        return None
    carried = [k for k in file_cfg if k not in ("dataset", "method") and k not in over and k in was and k in now
               and canonical_value(was[k]) != canonical_value(now[k])
               and canonical_value(file_cfg[k]) != canonical_value(now[k])]
    if not carried:
        return None
    flags = " ".join(f"{flag(k)} {over[k]}" for k in changed)
    named = " and ".join(f"{k}: {file_cfg[k]}" for k in changed)
    whose = "/".join(str(was[k]) for k in changed)
    run = " ".join(str(now[k]) for k in ("method", "dataset"))
    shown = ", ".join(f"{k} {json.dumps(file_cfg[k])} (default {json.dumps(now[k])})" for k in carried)
    return (f"{flags} overrides {named} in {config_file}, but the file's other {whose} options still apply to this "
            f"{run} run: {shown}; give them as flags, or start from configs/{now['method']}_{now['dataset']}.yaml")


def resolve(overrides: Dict[str, Any], config_file: Optional[str] = None, warn=None) -> Dict[str, Any]:
    """Full, checked run configuration: defaults(dataset, method) < config file < overrides (non-None).
    ``warn(message)``: told when the flags name another dataset or method than the config file
    while the file's options of its own dataset or method still apply (:func:`carried_over`)."""
    return resolve_named(overrides, config_file, warn)[0]


def resolve_named(overrides: Dict[str, Any], config_file: Optional[str] = None,
                  warn=None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """:func:`resolve`, and how the user gave each option they set (``--init-cls``, ``init_cls in
    FILE``), for what the run checks later in their words (a folder dataset's class count)."""
    file_cfg = load_config_file(config_file) if config_file else {}     # a file: another node may lack it
    over = {k: v for k, v in overrides.items() if v is not None}
    names = {k: f"{k} in {config_file}" for k in file_cfg} | {k: flag(k) for k in over}
    with the_same_on_every_rank():      # the options: every rank of a torchrun job gets them alike
        return _resolved(file_cfg, over, config_file, warn, names), names


def _resolved(file_cfg: Dict[str, Any], over: Dict[str, Any], config_file: Optional[str], warn,
              names: Dict[str, str]) -> Dict[str, Any]:
    """:func:`resolve` once the configuration file is read (``over``: the flags given)."""
    dataset = over.get("dataset", file_cfg.get("dataset", COMMON["dataset"]))
    method = over.get("method", file_cfg.get("method", COMMON["method"]))
    for k, v in (("dataset", dataset), ("method", method)):
        if not isinstance(v, str):
            raise ZeroflowError(f"{names.get(k, flag(k))} must be a string (got {v!r})")
    for k, v, valid in (("dataset", dataset, DATASETS), ("method", method, METHODS)):
        _choice(k, v.lower(), valid, names.get(k))
    message = carried_over(file_cfg, over, config_file) if warn is not None and config_file else None
    if message:
        warn(message)
    cfg = defaults_for(dataset.lower(), method.lower())
    cfg.update(file_cfg)
    cfg.update(over)
    out = validate(cfg, names)
    # the small ViT's pretraining, given for a timm backbone (pretrained already): refused, not
    # ignored, as small_vit is there. Only the options the user gave (``names``: the flags and the
    # file's), never the defaults'
    idle = [k for k in SMALL_PRETRAINING if k in names] if out["backbone"] != "small" else []
    if idle:
        raise ZeroflowError(f"{' and '.join(names[k] for k in idle)} set{'s' if len(idle) == 1 else ''} the "
                            f"pretraining of the small ViT (backbone: small), which zeroflow pretrains itself; this "
                            f"run's backbone is {out['backbone']}, pretrained already (drop "
                            f"{'them' if len(idle) > 1 else 'it'})")
    if out["dataset"] == "digits" and "img_size" in names:
        # the digits loader gives its 8x8 images whatever img_size says (check_small_vit tiles 8)
        raise ZeroflowError(f"{names['img_size']} sizes the images of the real datasets; the digits images are 8x8, "
                            f"as scikit-learn ships them (drop it)")
    if warn is not None and out["dataset"] == "digits":
        # the embedded data ships with scikit-learn: where the data is, and fetching it, never act
        # there (a resume says so too, runner.resumed_config); silently ignored before
        idle = []
        if out["data_root"] != COMMON["data_root"]:
            idle.append(f"{names['data_root']} {out['data_root']}")
        if out["download"]:
            idle.append(names["download"])
        if idle:
            warn(f"ignoring {' and '.join(idle)}: the digits data ships with scikit-learn (drop "
                 f"{'them' if len(idle) > 1 else 'it'})")
    return out


# what a null default means, for --help
NULL_MEANS = {"hybrid_switch": "off", "backend": "auto",
              "hybrid_zo_lr": "the ZO method's rate of the lr mapping (zo_sgd / adam entry), else --lr",
              "threads": "1 for the small ViT on CPU, else torch's choice",
              "ease_adapter_num": "unset (needs --ease-moni-adam)", "ease_later_lr": "--lr",
              "ease_later_epochs": "--epochs"}


def describe_default(key: str) -> str:
    """The built-in default of ``key`` for ``--help``: one value, or the digits value and a
    pointer to the per-dataset config files where the real datasets differ."""
    if key in ("method", "dataset"):
        return str(COMMON[key])
    values = {json.dumps(defaults_for(d, m).get(key), sort_keys=True) for d in DATASETS for m in METHODS}
    digits = defaults_for("digits", "ease").get(key)
    if digits is None:
        shown = NULL_MEANS.get(key, "none")
    elif isinstance(digits, dict):
        shown = ", ".join(f"{k} {v:g}" for k, v in digits.items())
    else:
        shown = str(digits)
    return shown if len(values) == 1 else f"{shown} on digits; see configs/<method>_<dataset>.yaml"
