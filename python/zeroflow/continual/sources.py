"""Where every default of ``defaults.py`` comes from, and the ``configs/*.yaml`` files that say so.

Each line of ``configs/<method>_<dataset>.yaml`` is one default with its source as a comment.
The files are written by ``python -m zeroflow.continual.sources [FOLDER]`` (default ``configs``);
a test checks that the shipped files are exactly what this module writes, so a default cannot
change without its file and its stated source. docs/continual.md has the same table in prose.
Light on purpose (no torch).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from .defaults import DATASETS, METHODS, defaults_for

LEGEND = """\
# Sources: [EASE] the EASE repository's published config for the dataset (sun-hailong/CVPR24-Ease
#   exps/ease_<cifar|cub|ina|omni>_in21k.json); [PILOT] LAMDA-PILOT's learner code and configs (models/ease.py,
#   utils/inc_net.py, exps/aper_*.json); [ref] the ZeroFlow reference optimizer code; [paper] the ZeroFlow paper;
#   [zeroflow] zeroflow's own choice (docs/continual.md says why). Facts: ../shared/reference/continual-reference.md.
"""

_EASE_FILE = {"cifar100": "ease_cifar_in21k.json", "cub": "ease_cub_in21k.json",
              "imagenet-a": "ease_ina_in21k.json", "omnibenchmark": "ease_omni_in21k.json"}
_OPERATIONAL = ("data_root", "download", "device", "backend", "checkpoint", "num_workers", "eval_batch_size",
                "threads", "record", "small_vit", "model_kwargs")
_EASE_VARIANT = ("ease_alpha", "ease_use_init_ptm", "ease_beta", "ease_moni_adam", "ease_adapter_num",
                 "ease_recalc_sim", "ease_use_reweight")


def source(key: str, dataset: str, method: str) -> str:
    """The source of ``defaults_for(dataset, method)[key]``, in a few words."""
    toy = dataset == "digits"
    ease_cfg = f"[EASE] {_EASE_FILE.get(dataset, 'ease_cifar_in21k.json (per-task variant)')}"
    if key in ("method", "dataset"):
        return "this file"
    if key.startswith("ease_") and method != "ease":
        return "EASE only (unused by APER)"
    if key in _OPERATIONAL:
        return "[zeroflow] operational"
    if key in _EASE_VARIANT:
        return ease_cfg if not toy else "[EASE] ease_cifar_in21k.json (the per-task variant)"
    if key in ("ease_later_lr", "ease_later_epochs"):
        return "[PILOT] unset: lr / epochs for every task"
    if toy and key in ("backbone", "adapter_dim", "init_cls", "increment", "epochs", "batch_size", "lr",
                       "weight_decay", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size"):
        return "[zeroflow] the embedded toy (docs/continual.md)"
    fixed = {
        "optimizer": "[zeroflow] the default forward-pass method",
        "seed": "[PILOT] seed 1993 in every published config",
        "class_order_seed": "[PILOT] the class order of seed 1993 (PILOT ties it to the run seed)",
        "momentum": "[PILOT] SGD momentum 0.9",
        "schedule": "[PILOT] cosine scheduler",
        "q": "[ref] one query, two-sided",
        "zo_eps": "[ref] eps 1e-3",
        "perturbation": "[ref] Gaussian z",
        "sparsity": "[paper] enhancement off by default",
        "history": "[paper] enhancement off by default",
        "hybrid_switch": "[paper] enhancement off by default",
        "hybrid_zo_lr": "[zeroflow] null: the ZO method's rate of lr (hybrid runs only)",
        "precision": "[zeroflow] the fidelity study's choice (docs/algorithms.md section 10)",
        "baseline": ("[zeroflow] on the toy untrained adapters score about as well: show the gain" if toy else
                     "[zeroflow] off (an extra evaluation of every stage)"),
        "backbone": "[paper] ViT-B/16-IN21K",
        "adapter_dim": f"{ease_cfg} ffn_num" if method == "ease" else "[PILOT] exps/aper_aperpter.json ffn_num",
        "img_size": "[PILOT] 224 px transforms",
        "init_cls": "[paper] 10 equal tasks",
        "increment": "[paper] 10 equal tasks",
        "epochs": f"{ease_cfg} init_epochs" if method == "ease" else "[PILOT] exps/aper_aperpter.json tuned_epoch",
        "batch_size": f"{ease_cfg} batch_size" if method == "ease" else "[PILOT] exps/aper_aperpter.json batch_size",
        "lr": ((f"sgd: {ease_cfg} init_lr" if method == "ease" else "sgd: [PILOT] exps/aper_aperpter.json init_lr")
               + "; zo_sgd: [ref] ZO-SGD lr 1e-4; adam: [ref] Adam lr 1e-3"),
        "weight_decay": (f"{ease_cfg} weight_decay" if method == "ease" else
                         "[PILOT] exps/aper_aperpter.json weight_decay"),
    }
    return fixed[key]


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return repr(v) if "e" not in repr(v) else f"{v:.10f}".rstrip("0")     # YAML 1.1 reads 1e-3 as a string
    return json.dumps(v) if isinstance(v, str) and (not v or any(c in v for c in ":#{}[],")) else str(v)


def config_yaml(dataset: str, method: str) -> str:
    """The text of ``configs/<method>_<dataset>.yaml``."""
    d: Dict[str, Any] = defaults_for(dataset, method)
    head = (f"# zeroflow run defaults: {method.upper()} on {dataset} (docs/continual.md, \"Defaults and their "
            f"sources\").\n# Use with: zeroflow run --config configs/{method}_{dataset}.yaml [flags override]\n")
    width = max(len(f"{k}: {_yaml_value(v)}") for k, v in d.items()) + 2
    lines = [f"{k}: {_yaml_value(v)}".ljust(width) + f"# {source(k, dataset, method)}" for k, v in d.items()]
    return head + LEGEND + "\n".join(lines) + "\n"


def write_configs(folder: str = "configs") -> None:
    for dataset in DATASETS:
        for method in METHODS:
            with open(os.path.join(folder, f"{method}_{dataset}.yaml"), "w") as f:
                f.write(config_yaml(dataset, method))


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m zeroflow.continual.sources",
                                 description="Write configs/<method>_<dataset>.yaml from defaults.py (the shipped "
                                             "files must equal this output; a test checks it).")
    ap.add_argument("folder", nargs="?", default="configs", help="an existing folder (default: configs)")
    folder = ap.parse_args(argv).folder
    if not os.path.isdir(folder):
        ap.error(f"folder {folder!r} does not exist: run from the repository root, or name an existing folder")
    write_configs(folder)


if __name__ == "__main__":
    main()
