"""timm ViT backbones with AdaptFormer adapter subspaces.

* ``vit_base_patch16_224.augreg_in21k`` (ViT-B/16-IN21K): ``pretrained=True`` through timm
  (HF hub / local cache) or ``checkpoint=PATH`` (.safetensors / .pth / .npz) through
  timm's own ``load_pretrained`` (``pretrained_cfg_overlay=dict(file=PATH)``).
* ``small``: a timm ``VisionTransformer`` for the embedded 8x8 digits, pretrained
  self-supervised (see :func:`pretrain_small_backbone` and docs/continual.md).

The backbone is frozen. Feature = the ViT's own pre-logits feature (timm's
``forward_head(pre_logits=True)``): for ViT-B/16-IN21K and the small ViT (token pooling) the
CLS token after the final LayerNorm; for a ViT built with ``global_pool`` avg / map (or
without a class token) its pooled feature, not the first token. An adapter set has
one AdaptFormer adapter per block (Linear d->r, ReLU, Dropout 0.1, Linear r->d, x 0.1),
added in parallel to the block's MLP, fed with the residual stream after attention.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._atomic import atomic_torch_save
from .defaults import SMALL_VIT
from .errors import ZeroflowError
from .precision import forward_precision

VIT_B_IN21K = "vit_base_patch16_224.augreg_in21k"


class Adapter(nn.Module):
    """AdaptFormer bottleneck; starts as the zero function (up-projection and biases zero)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.dropout(F.relu(self.down(x)))) * self.scale


class AdapterSet(nn.ModuleList):
    """One adapter per transformer block: a "subspace" in EASE's terms."""

    def __init__(self, depth: int, dim: int, bottleneck: int, dropout: float = 0.1):
        super().__init__([Adapter(dim, bottleneck, dropout) for _ in range(depth)])


class AdaptedViT(nn.Module):
    """A frozen timm ViT plus a list of adapter sets; ``features(x, k)`` runs the ViT with
    adapter set ``k`` (``None``: the plain pretrained model) in the forward precision
    ``self.precision`` (``--precision``, see :mod:`.precision`) and returns fp32 features."""

    precision = "fp32"

    def __init__(self, vit: nn.Module, bottleneck: int, dropout: float = 0.1):
        super().__init__()
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.vit.eval()
        self.dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.bottleneck = int(bottleneck)
        self.dropout = float(dropout)
        self.adapters = nn.ModuleList()

    def add_adapter_set(self) -> AdapterSet:
        ref = next(self.vit.parameters())
        s = AdapterSet(self.depth, self.dim, self.bottleneck, self.dropout).to(ref.device)
        self.adapters.append(s)
        return s

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # the frozen backbone always runs in eval mode
        return self

    def features(self, x: torch.Tensor, adapter: Optional[int] = None) -> torch.Tensor:
        with forward_precision(self.precision, x.device.type):
            f = self._features(x, adapter)
        return f.float()     # the head, the prototypes and the loss stay fp32

    def _features(self, x: torch.Tensor, adapter: Optional[int]) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        aset = self.adapters[adapter] if adapter is not None else None
        for i, blk in enumerate(vit.blocks):
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            h = x
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            if aset is not None:
                x = x + aset[i](h)
        x = vit.norm(x)
        # timm's own pooling: x[:, 0] for token pooling (the same bits); for a ViT pooled by avg
        # or map (global_pool, or no class token) x[:, 0] was a single token (a patch's when there
        # is no class token) without the fc_norm that timm applies after the pooling
        return vit.forward_head(x, pre_logits=True)


# ---------------------------------------------------------------- loading
class _MissingKeys(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "Missing keys" in msg:
            self.messages.append(msg)


def check_timm_backbone(arch: str, model_kwargs: Optional[Dict], adapter_dim: int, img_size: int) -> None:
    """That ``arch`` with ``model_kwargs`` builds a timm ViT which takes adapters and runs on
    ``img_size`` images: built and run once on the meta device (no memory, no weights; 0.5 s
    for a ViT-B on this CPU), so that a bad option is one error before a run claims its
    folder, not a failure after the weights have loaded (or a TypeError wrapped as "weights
    not available")."""
    import timm

    kw = dict(model_kwargs or {})
    given = f" with model_kwargs {kw}" if kw else ""
    try:
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
    except Exception as e:
        if not kw or not timm.is_model(arch):
            raise ZeroflowError(f"backbone {arch!r} is not a timm model ({type(e).__name__}: {str(e)[:200]}); use a "
                                f"timm ViT such as {VIT_B_IN21K}") from e
        raise ZeroflowError(f"model_kwargs {kw} do not build timm's {arch} ({type(e).__name__}: {str(e)[:200]}); "
                            f"give options of its VisionTransformer (e.g. depth, embed_dim, num_heads, img_size) "
                            f"that fit together") from e
    if not (hasattr(vit, "blocks") and hasattr(vit, "embed_dim") and hasattr(vit, "patch_embed")):
        raise ZeroflowError(f"backbone {arch} is not a ViT (a timm VisionTransformer with blocks, embed_dim and "
                            f"patch_embed): the adapters go into its blocks; use a timm ViT such as {VIT_B_IN21K}")
    try:
        with torch.device("meta"):
            net = AdaptedViT(vit, adapter_dim)
            net.add_adapter_set()
            feature = net.features(torch.empty(1, 3, img_size, img_size), 0)
    except AttributeError as e:
        # a missing part (a post-norm ResPostBlock has no ls1, a relative-position ViT no
        # _pos_embed) is the model's structure, which no img_size fixes
        raise ZeroflowError(f"backbone {arch}{given} is not built like timm's VisionTransformer, whose forward the "
                            f"adapters follow (patch_embed, _pos_embed, pre-norm blocks with norm1, attn, ls1, "
                            f"drop_path1, norm2, mlp, ls2, drop_path2; {type(e).__name__}: {str(e)[:200]}); use a "
                            f"timm ViT with standard blocks such as {VIT_B_IN21K}") from e
    except Exception as e:
        raise ZeroflowError(f"backbone {arch}{given} does not run on the {img_size}x{img_size} images of this run "
                            f"(img_size) with adapters ({type(e).__name__}: {str(e)[:200]}); make the model's "
                            f"img_size (model_kwargs) and img_size agree") from e
    if tuple(feature.shape) != (1, net.dim):
        # global_pool '' keeps every token: the heads and prototypes need one vector per image
        raise ZeroflowError(f"backbone {arch}{given} gives features of shape {tuple(feature.shape)[1:]} per image, "
                            f"not one {net.dim}-d vector (global_pool '' pools no token); give model_kwargs "
                            f"global_pool token (the class token), avg or map")


def load_timm_vit(arch: str = VIT_B_IN21K, *, checkpoint: Optional[str] = None, pretrained: bool = True,
                  model_kwargs: Optional[Dict] = None) -> nn.Module:
    """Create ``arch`` with ``num_classes=0`` and its pretrained weights.

    ``checkpoint``: a local .safetensors / .pth / .pt / .bin (a state dict, optionally under
    ``state_dict`` / ``model``) or a big_vision .npz, loaded by timm's ``load_pretrained``.
    ``model_kwargs`` override the architecture (e.g. a tiny config in tests).
    """
    import timm

    kw = dict(model_kwargs or {})
    kw["num_classes"] = 0
    if not checkpoint and not pretrained:
        return timm.create_model(arch, pretrained=False, **kw)
    overlay = None
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise ZeroflowError(f"--checkpoint {checkpoint}: no such file")
        overlay = dict(file=os.path.abspath(checkpoint), custom_load=str(checkpoint).endswith(".npz"))
    handler = _MissingKeys()
    log = logging.getLogger("timm.models._builder")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    except Exception as e:
        if checkpoint:
            raise ZeroflowError(
                f"could not load backbone weights from --checkpoint {checkpoint} for {arch}: "
                f"{type(e).__name__}: {str(e)[:300]}. The file must be a timm/PyTorch state dict "
                f"(.pth/.pt/.bin/.safetensors) or a big_vision .npz for this architecture.") from e
        raise ZeroflowError(
            f"pretrained weights for {arch} are not available ({type(e).__name__}: {str(e)[:200]}). "
            f"Provide them with --checkpoint PATH (a local .safetensors/.pth/.npz of {arch}, e.g. "
            f"the Hugging Face file timm/{arch}/model.safetensors), or put them in the Hugging Face "
            f"cache (HF_HOME) on a machine with network access and run with HF_HUB_OFFLINE=1.") from e
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    missing = [m for m in handler.messages if "Missing keys" in m]
    if missing:
        raise ZeroflowError(
            f"--checkpoint {checkpoint} does not match {arch}: {missing[0][:300]}")
    return model


def build_small_vit(in_chans: int, img_size: int, cfg: Optional[Dict] = None) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    c = dict(SMALL_VIT)
    c.update(cfg or {})
    try:
        return VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=0, global_pool="token",
                                 class_token=True, **c)
    except (TypeError, ValueError, AssertionError) as e:     # defaults.check_small_vit should have said so
        raise ZeroflowError(f"small_vit {cfg}: timm cannot build this small ViT ({type(e).__name__}: {e})") from e


def cache_dir() -> str:
    return os.environ.get("ZEROFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zeroflow")


def pretrain_small_backbone(data, *, vit_cfg: Optional[Dict], epochs: int, lr: float, batch_size: int,
                            seed: int, device: torch.device, progress: bool = False, warn=None) -> nn.Module:
    """The embedded default's "pretrained model": the small ViT trained self-supervised,
    first-order (AdamW, one-cycle lr), on the **unlabeled** training images of the dataset:
    50% of the 2x2 patches are zeroed and the clean image is reconstructed from the CLS
    feature through a small MLP decoder (then discarded). No label and no test image is
    used. Cached under ``$ZEROFLOW_CACHE`` (default ~/.cache/zeroflow) by its configuration;
    ``warn`` (default: a Python warning) says once per process that a cache folder cannot be
    written. See docs/continual.md for why not a supervised base session."""
    # v=3: the training augmentation is drawn per sample from (seed, epoch, index) since
    # 2026-12-02 (data.SeededDraws): weights cached before were made from other draws
    key_src = json.dumps(dict(v=3, dataset=data.name, n=len(data.train_targets), vit=vit_cfg or {}, small=SMALL_VIT,
                              epochs=epochs, lr=lr, bs=batch_size, seed=seed, in_chans=data.in_chans,
                              img=data.img_size), sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"small_vit_{key}.pt")
    vit = build_small_vit(data.in_chans, data.img_size, vit_cfg)
    if os.path.isfile(path):
        try:
            vit.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return vit
        except Exception:  # noqa: BLE001 - whatever is wrong with a cache entry, it is rebuilt
            pass
    torch.manual_seed(seed)
    vit = build_small_vit(data.in_chans, data.img_size, vit_cfg).to(device)
    npix = data.in_chans * data.img_size * data.img_size
    dec = nn.Sequential(nn.Linear(vit.embed_dim, 2 * vit.embed_dim), nn.GELU(),
                        nn.Linear(2 * vit.embed_dim, npix)).to(device)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(dec.parameters()), lr=lr, weight_decay=0.05)
    loader = data.loader("train", range(data.n_classes), batch_size, shuffle=True, seed=seed)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    p = int(vit.patch_embed.patch_size[0])
    gh = data.img_size // p
    from tqdm.auto import tqdm
    vit.train()
    for _ in tqdm(range(epochs), desc="pretrain small ViT (masked reconstruction, unlabeled)",
                  disable=not progress, leave=False):
        for x, _y in loader:
            x = x.to(device)
            keep = (torch.rand(x.shape[0], 1, gh, gh, device=device) > 0.5).float()
            keep = keep.repeat_interleave(p, 2).repeat_interleave(p, 3)
            rec = dec(vit.forward_features(x * keep)[:, 0])
            loss = 10.0 * F.mse_loss(rec, x.flatten(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    vit.eval().cpu()
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        atomic_torch_save(vit.state_dict(), path)
    except OSError as e:
        # the run goes on with the weights it has; said, since every later run pretrains again
        # (a read-only $ZEROFLOW_CACHE or home): once, not for each run of a sweep
        if cache_dir() not in _UNWRITABLE_CACHES:
            _UNWRITABLE_CACHES.add(cache_dir())
            source = "$ZEROFLOW_CACHE" if os.environ.get("ZEROFLOW_CACHE") else "the default of $ZEROFLOW_CACHE"
            (warn or _warn_python)(f"the pretrained small ViT could not be cached in {cache_dir()} ({source}): "
                                   f"{type(e).__name__}: {e}; the next run will pretrain it again (set "
                                   f"ZEROFLOW_CACHE to a writable folder to keep it)")
    return vit


_UNWRITABLE_CACHES: set = set()       # cache folders already named in a warning by this process


def _warn_python(message: str) -> None:
    warnings.warn(f"zeroflow: {message}", UserWarning, stacklevel=3)
