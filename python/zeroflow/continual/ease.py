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
        self.protos = None                 # [C, T, d]
        self.task_of_class: List[int] = []
        self.task_classes: List[List[int]] = []

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
    def learn_task(self, t: int, classes: List[int], data, ctx) -> Dict:
        net, cfg, dev = self.net, self.cfg, self.device
        assert len(net.adapters) == t, "EASE: one adapter set per finished task expected"
        aset = net.add_adapter_set()
        head = CosineLinear(net.dim, len(classes)).to(dev)
        loader = data.loader("train", classes, int(cfg["batch_size"]), shuffle=True, seed=ctx.seed,
                             num_workers=int(cfg.get("num_workers", 0)), shard=ctx.shard)
        info = train_subspace(net, lambda x: head(net.features(x, t)), {f"adapters.{t}": aset, "head": head}, loader,
                              cfg, label_offset=min(classes), seed=ctx.seed, device=dev, counters=ctx.counters,
                              timer=ctx.timer, progress_desc=f"task {t + 1}/{ctx.n_tasks} EASE {cfg['optimizer']}",
                              progress=ctx.progress, data_parallel=ctx.shard is not None, record=ctx.record_stem(t))
        # prototypes of the new classes in every subspace
        pl = data.loader("train_eval", classes, int(cfg.get("eval_batch_size", 256)),
                         num_workers=int(cfg.get("num_workers", 0)))
        feats, labels = extract(net, pl, list(range(t + 1)), dev, ctx.counters)
        new = class_means(feats, labels, classes)                     # [n_new, t+1, d]
        if self.protos is None:
            self.protos = new
        else:
            old = torch.cat([self.protos, torch.zeros(self.protos.shape[0], 1, self.protos.shape[2])], dim=1)
            self.protos = torch.cat([old, new], dim=0)
        self.task_of_class += [t] * len(classes)
        self.task_classes.append(list(classes))
        self._complement(t)
        return info

    def _complement(self, t: int):
        P = self.protos
        for i in range(t):                       # old task
            old = torch.as_tensor(self.task_classes[i])
            for d in range(i + 1, t + 1):         # later subspace without real prototypes for task i
                ref = torch.as_tensor([c for k in range(d, t + 1) for c in self.task_classes[k]])
                sim = F.normalize(P[old, i], dim=-1) @ F.normalize(P[ref, i], dim=-1).T   # [n_old, n_ref]
                S = torch.softmax(sim, dim=-1)
                P[old, d] = S @ P[ref, d]
        self.protos = P

    # -------------------------------------------------------------- inference
    def eval_adapters(self):
        return list(range(len(self.net.adapters)))

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, T, d] -> logits [B, C] with subspace reweighting."""
        T = feats.shape[1]
        cos = torch.einsum("btd,ctd->bct", F.normalize(feats, dim=-1), F.normalize(self.protos[:, :T], dim=-1))
        t = T - 1
        w = torch.full((self.protos.shape[0], T), self.alpha / t if t > 0 else 0.0)
        w[torch.arange(len(self.task_of_class)), torch.as_tensor(self.task_of_class)] = 1.0
        return (cos * w.unsqueeze(0)).sum(-1)
