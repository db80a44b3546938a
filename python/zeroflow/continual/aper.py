"""APER with an AdaptFormer adapter (Zhou et al., 2023, "Revisiting CIL with PTMs").

* Stage 0 only: train one adapter set + a cosine head over the first task's classes with
  cross-entropy (the configured optimizer); then freeze and drop the head.
* Feature = concat(frozen PTM feature, adapted feature) (2d; 1536 for ViT-B).
* Classifier = class prototypes (mean of un-normalized concatenated training features,
  test transform), appended for every new task without training; prediction = argmax cos.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from .learners import CosineLinear, adapters_state, class_means, extract, load_adapters, train_subspace


class APER:
    name = "aper"

    def __init__(self, net, cfg: Dict, device: torch.device):
        self.net, self.cfg, self.device = net, cfg, device
        self.protos = None   # [C, 2d]

    def state_dict(self):
        return {**adapters_state(self.net), "protos": self.protos}

    def load_state_dict(self, sd):
        load_adapters(self.net, sd)
        self.protos = sd["protos"]

    def learn_task(self, t: int, classes: List[int], data, ctx) -> Dict:
        net, cfg, dev = self.net, self.cfg, self.device
        info = {"steps": 0, "forward_passes": 0}
        if t == 0:
            aset = net.add_adapter_set()
            head = CosineLinear(net.dim, len(classes)).to(dev)
            loader = data.loader("train", classes, int(cfg["batch_size"]), shuffle=True, seed=ctx.seed,
                                 num_workers=int(cfg.get("num_workers", 0)), shard=ctx.shard)
            info = train_subspace(net, lambda x: head(net.features(x, 0)), {"adapters.0": aset, "head": head},
                                  loader, cfg, label_offset=min(classes), seed=ctx.seed, device=dev,
                                  counters=ctx.counters, timer=ctx.timer,
                                  progress_desc=f"task 1/{ctx.n_tasks} APER {cfg['optimizer']}",
                                  progress=ctx.progress, data_parallel=ctx.shard is not None, mem=ctx.mem,
                                  record=ctx.record_stem(0), scaler=getattr(ctx, "scaler", None))
        pl = data.loader("train_eval", classes, int(cfg.get("eval_batch_size", 256)),
                         num_workers=int(cfg.get("num_workers", 0)))
        feats, labels = extract(net, pl, self.eval_adapters(), dev, ctx.counters)
        new = class_means(feats.flatten(1), labels, classes)
        self.protos = new if self.protos is None else torch.cat([self.protos, new])
        return info

    def eval_adapters(self):
        return [None, 0]

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats.flatten(1), dim=-1) @ F.normalize(self.protos, dim=-1).T
