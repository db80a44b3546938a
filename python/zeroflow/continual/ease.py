"""EASE (Zhou et al., CVPR 2024): expandable adapter subspaces + semantic-guided prototypes.

* Task t: a fresh adapter set (subspace t) + a temporary cosine head over the task's
  classes, trained with cross-entropy on the task's data only (labels shifted to
  0..n_t-1) by the configured optimizer; then frozen and the head discarded.
* Prototypes P[c, j] = mean feature of class c's training images (test transform) in
  subspace j, for the new classes in every subspace 0..t.
* Semantic-guided complement: old task i (< t) has no real prototype in a later subspace
  d (i < d <= t). Reference classes R = classes of tasks d..t (real prototypes in both
  subspaces i and d). For old class o: S_o = softmax_r( cos(P[o, i], P[r, i]) ),
  P[o, d] = sum_r S_or P[r, d]. Recomputed at every stage (R grows as tasks arrive).
* Inference: logit_c = sum_j w_ij cos(x_j, P[c, j]) with i = task of c, w_ii = 1 and
  w_ij = alpha / t for j != i (t = 0-based index of the current task; alpha = 0.1, CUB 0.05).

The variants of PILOT's EASE (``models/ease.py``, options named there without our ``ease_``
prefix; docs/continual.md lists them with their sources):

* ``ease_use_init_ptm``: the frozen PTM's own features are one more subspace (the first),
  with real prototypes for every class, weighted by ``ease_beta`` in the reweighted inference.
* ``ease_moni_adam`` + ``ease_adapter_num``: only the first ``adapter_num`` tasks train an
  adapter; later tasks add no subspace (their classes get prototypes in the existing ones),
  and inference is the plain cosine classifier (PILOT's ``fc``: the cosine of the
  concatenated features and prototypes), as in PILOT's ``EaseNet.forward``.
* ``ease_recalc_sim`` false: PILOT's ``solve_similarity`` instead of ``solve_sim_reset``:
  each stage fills only the newest subspace of the old classes, with the current task's
  classes as the reference; earlier complements are kept as they were computed.
* ``ease_use_reweight`` false: the plain cosine classifier instead of the reweighting.
* ``ease_later_lr`` / ``ease_later_epochs``: lr and epochs of the tasks after the first on
  B-N splits (PILOT trains every task with ``init_lr`` / ``init_epochs`` when
  ``init_cls == increment``).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from .learners import CosineLinear, adapters_state, class_means, extract, load_adapters, train_subspace


class EASE:
    name = "ease"

    def __init__(self, net, cfg: Dict, device: torch.device):
        self.net, self.cfg, self.device = net, cfg, device
        self.alpha = float(cfg.get("ease_alpha", 0.1))
        self.beta = float(cfg.get("ease_beta", 0.0))
        self.moni_adam = bool(cfg.get("ease_moni_adam", False))
        self.adapter_num = cfg.get("ease_adapter_num") if self.moni_adam else None   # None: one per task
        self.idle = [k for k, idle in (("ease_adapter_num", not self.moni_adam and cfg.get("ease_adapter_num")),
                                       ("ease_beta", not cfg.get("ease_use_init_ptm") and cfg.get("ease_beta")))
                     if idle]
        self.recalc_sim = bool(cfg.get("ease_recalc_sim", True))
        # PILOT's EaseNet.forward: moni_adam always classifies with the plain cosine fc
        self.use_reweight = bool(cfg.get("ease_use_reweight", True)) and not self.moni_adam
        self.offset = 1 if cfg.get("ease_use_init_ptm", False) else 0   # subspace j is adapter set j - offset
        self.protos = None                 # [C, S, d]: S subspaces ([PTM] + adapter sets)
        self.task_of_class: List[int] = []
        self.task_classes: List[List[int]] = []

    def describe(self) -> str:
        """One line for the run's log: the variant these options make."""
        ptm = ("PTM subspace" + (f" (beta {self.beta:g})" if self.use_reweight else "") + " + ") if self.offset else ""
        trained = (f"adapters for the first {self.adapter_num} task(s) only (moni_adam)" if self.moni_adam
                   else "one adapter per task")
        infer = f"reweighted inference (alpha {self.alpha:g})" if self.use_reweight else "plain cosine fc inference"
        sim = "recalc_sim" if self.recalc_sim else "solve_similarity (no recalc_sim)"
        idle = self.idle + ([] if self.use_reweight else ["ease_alpha"] + ["ease_beta"] * bool(self.offset))
        return f"EASE variant: {ptm}{trained}, {sim}, {infer}" + (
            f"; not acting here: {', '.join(sorted(set(idle)))}" if idle else "")

    # -------------------------------------------------------------- state
    def state_dict(self):
        return {**adapters_state(self.net), "protos": self.protos, "task_of_class": list(self.task_of_class),
                "task_classes": [list(c) for c in self.task_classes]}

    def load_state_dict(self, sd):
        load_adapters(self.net, sd)
        self.protos = sd["protos"]
        self.task_of_class = list(sd["task_of_class"])
        self.task_classes = [list(c) for c in sd["task_classes"]]

    # -------------------------------------------------------------- training
    def trains(self, t: int) -> bool:
        """Does task ``t`` train (and add) an adapter set?"""
        return self.adapter_num is None or t < self.adapter_num

    def task_cfg(self, t: int) -> Dict:
        """The run configuration task ``t`` trains with: ``ease_later_lr`` / ``ease_later_epochs``
        replace lr / epochs after the first task (validation allows them on B-N splits only)."""
        cfg = self.cfg
        later = {k: cfg.get(f"ease_later_{k}") for k in ("lr", "epochs")}
        if t == 0 or all(v is None for v in later.values()):
            return cfg
        return dict(cfg, **{k: v for k, v in later.items() if v is not None})

    def learn_task(self, t: int, classes: List[int], data, ctx) -> Dict:
        net, cfg, dev = self.net, self.cfg, self.device
        expected = t if self.adapter_num is None else min(t, self.adapter_num)
        assert len(net.adapters) == expected, "EASE: one adapter set per finished training task expected"
        info = {"steps": 0, "forward_passes": 0}
        if self.trains(t):
            aset = net.add_adapter_set()
            head = CosineLinear(net.dim, len(classes)).to(dev)
            task_cfg = self.task_cfg(t)
            loader = data.loader("train", classes, int(task_cfg["batch_size"]), shuffle=True, seed=ctx.seed,
                                 num_workers=int(cfg.get("num_workers", 0)), shard=ctx.shard)
            info = train_subspace(net, lambda x: head(net.features(x, t)), {f"adapters.{t}": aset, "head": head},
                                  loader, task_cfg, label_offset=min(classes), seed=ctx.seed, device=dev,
                                  counters=ctx.counters, timer=ctx.timer,
                                  progress_desc=f"task {t + 1}/{ctx.n_tasks} EASE {cfg['optimizer']}",
                                  progress=ctx.progress, data_parallel=ctx.shard is not None, mem=ctx.mem,
                                  record=ctx.record_stem(t), scaler=getattr(ctx, "scaler", None))
        # prototypes of the new classes in every subspace
        pl = data.loader("train_eval", classes, int(cfg.get("eval_batch_size", 256)),
                         num_workers=int(cfg.get("num_workers", 0)))
        feats, labels = extract(net, pl, self.eval_adapters(), dev, ctx.counters)
        new = class_means(feats, labels, classes)                     # [n_new, S, d]
        if self.protos is None:
            self.protos = new
        else:
            grown = new.shape[1] - self.protos.shape[1]                # 1 if this task added a subspace, else 0
            old = torch.cat([self.protos, torch.zeros(self.protos.shape[0], grown, self.protos.shape[2])], dim=1)
            self.protos = torch.cat([old, new], dim=0)
        self.task_of_class += [t] * len(classes)
        self.task_classes.append(list(classes))
        self._complement(t)
        return info

    def _complement(self, t: int):
        P, off = self.protos, self.offset
        for i in range(t):                       # old task
            old = torch.as_tensor(self.task_classes[i])
            # adapter subspaces made after task i: no real prototypes of its classes there
            for d in range(i + 1, len(self.net.adapters)):
                if not self.recalc_sim and d != t:
                    continue                     # solve_similarity: keep the complement computed at stage d
                ref = torch.as_tensor([c for k in range(d, t + 1) for c in self.task_classes[k]])
                sim = F.normalize(P[old, off + i], dim=-1) @ F.normalize(P[ref, off + i], dim=-1).T  # [n_old, n_ref]
                S = torch.softmax(sim, dim=-1)
                P[old, off + d] = S @ P[ref, off + d]
        self.protos = P

    # -------------------------------------------------------------- inference
    def eval_adapters(self):
        return [None] * self.offset + list(range(len(self.net.adapters)))

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, S, d] -> logits [B, C]."""
        S = feats.shape[1]
        if not self.use_reweight:
            # PILOT's fc: one cosine over the concatenated subspaces
            return F.normalize(feats.flatten(1), dim=-1) @ F.normalize(self.protos[:, :S].flatten(1), dim=-1).T
        cos = torch.einsum("bsd,csd->bcs", F.normalize(feats, dim=-1), F.normalize(self.protos[:, :S], dim=-1))
        t = len(self.task_classes) - 1
        w = torch.full((self.protos.shape[0], S), self.alpha / t if t > 0 else 0.0)
        if self.offset:
            w[:, 0] = self.beta                  # the PTM subspace
        w[torch.arange(len(self.task_of_class)), self.offset + torch.as_tensor(self.task_of_class)] = 1.0
        return (cos * w.unsqueeze(0)).sum(-1)
