"""EASE and APER prototypes as the reference computes them (continual-reference.md): the mean
feature of each class's training images under the **test** transform, extracted in eval mode
(adapter dropout off) whatever mode training left the network in, on a tiny timm ViT.

The training split here differs from the prototype split (its images are shifted), and the
adapters use dropout 0.9 after a first-order task has made them non-zero, so a learner taking
the augmented split or extracting in train mode gives other prototypes."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

N_PER_CLASS = 6


class _Data:
    """Two tasks of two classes; ``train`` = ``train_eval`` + 0.5 (the "augmentation")."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.tasks = [[0, 1], [2, 3]]
        self.y = torch.arange(4).repeat_interleave(N_PER_CLASS)
        self.x = torch.rand(len(self.y), 3, 8, 8, generator=g)

    def images(self, split, classes):
        m = torch.isin(self.y, torch.as_tensor(classes))
        return (self.x[m] + 0.5 if split == "train" else self.x[m]), self.y[m]

    def loader(self, split, classes, batch_size, *, shuffle=False, seed=0, num_workers=0, shard=None):
        x, y = self.images(split, classes)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed))


def _net():
    from timm.models.vision_transformer import VisionTransformer

    from zeroflow.continual.backbones import AdaptedViT
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=0, embed_dim=16, depth=2,
                            num_heads=2, mlp_ratio=2.0)
    return AdaptedViT(vit, 4, dropout=0.9)


def _ctx():
    from zeroflow.continual.learners import Counters
    return SimpleNamespace(seed=1, n_tasks=2, counters=Counters(), timer=SimpleNamespace(now=lambda: 0.0),
                           progress=False, shard=None, mem=None, scaler=None, record_stem=lambda t: None)


def _means(net, data, split, classes, adapters, train_mode):
    x, y = data.images(split, classes)
    net.train(train_mode)
    torch.manual_seed(5)
    with torch.no_grad():
        f = torch.stack([net.features(x, a) for a in adapters], 1)
    return torch.stack([f[y == c].mean(0) for c in classes])


CFG = dict(optimizer="fo_sgd", lr=0.5, momentum=0.0, weight_decay=0.0, epochs=2, batch_size=4,
           schedule="constant", eval_batch_size=1000)


@pytest.mark.parametrize("method", ["ease", "aper"])
def test_prototypes_are_eval_mode_means_of_the_test_transform_images(method):
    from zeroflow.continual.runner import make_learner
    data, net = _Data(), _net()
    learner = make_learner(dict(CFG, method=method), net, torch.device("cpu"))
    for t, classes in enumerate(data.tasks):
        net.train(True)              # whatever mode the network is in, prototypes are extracted in eval mode
        learner.learn_task(t, classes, data, _ctx())
        ups = [a.up.weight for a in net.adapters[0]]
        assert all(float(u.abs().sum()) > 0 for u in ups)       # trained: dropout would change the features
        adapters = learner.eval_adapters()
        want = _means(net, data, "train_eval", classes, adapters, train_mode=False)
        got = learner.protos[classes]
        if method == "aper":         # [C, 2d]: the PTM and the adapted feature side by side
            got = got.view(len(classes), len(adapters), -1)
        got = got[:, :len(adapters)]
        assert torch.equal(got, want), (method, t)
        # the test is sensitive to both mistakes
        assert not torch.allclose(got, _means(net, data, "train", classes, adapters, train_mode=False))
        assert not torch.allclose(got, _means(net, data, "train_eval", classes, adapters, train_mode=True))
    if method == "ease":
        assert len(net.adapters) == 2 and not any(p.requires_grad for p in net.adapters.parameters())


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg"), dict(class_token=False, global_pool="avg"),
                                dict(global_pool="map")])
def test_the_feature_is_the_vits_own_pre_logits_feature(kw):
    """The adapted ViT's feature without an adapter (and with an untrained one, which adds zero)
    is timm's own pre-logits feature of the model: the CLS token for token pooling, the pooled
    tokens for avg / map pooling. The check accepts such backbones (model_kwargs global_pool),
    and the first token was taken for them: a patch token, or the CLS token without fc_norm."""
    import timm

    from zeroflow.continual.backbones import AdaptedViT, check_timm_backbone
    arch, tiny = "vit_base_patch16_224.augreg_in21k", dict(depth=2, embed_dim=32, num_heads=2, img_size=32,
                                                            patch_size=8, **kw)
    check_timm_backbone(arch, tiny, 8, 32)
    torch.manual_seed(0)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **tiny)
    net = AdaptedViT(vit, 8)
    net.add_adapter_set()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = vit(x)
        assert torch.equal(net.features(x, None), want)
        assert torch.equal(net.features(x, 0), want)


@pytest.mark.parametrize("arch, missing", [("vit_base_patch16_rpn_224", "'ResPostBlock' object has no attribute 'ls1'"),
                                           ("vit_relpos_base_patch16_224", "has no attribute '_pos_embed'")])
def test_a_vit_of_another_structure_is_refused_for_its_structure_not_its_img_size(arch, missing):
    """A timm ViT whose blocks or embedding the adapted forward does not know (post-norm blocks,
    relative positions) was refused with "make the model's img_size (model_kwargs) and img_size
    agree", which they already did."""
    from zeroflow.continual.backbones import check_timm_backbone
    from zeroflow.continual.errors import ZeroflowError
    with pytest.raises(ZeroflowError) as e:
        check_timm_backbone(arch, None, 64, 224)
    msg = str(e.value)
    assert msg.startswith(f"backbone {arch} is not built like timm's VisionTransformer") and missing in msg, msg
    assert "img_size" not in msg and msg.endswith("use a timm ViT with standard blocks such as "
                                                  "vit_base_patch16_224.augreg_in21k")


def test_a_vit_that_pools_no_token_is_refused():
    """model_kwargs global_pool '': timm's pre-logits feature is every token, [N, d] per image,
    which the heads and prototypes cannot take; refused before the run, naming the fix."""
    from zeroflow.continual.backbones import check_timm_backbone
    from zeroflow.continual.errors import ZeroflowError
    tiny = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
    with pytest.raises(ZeroflowError) as e:
        check_timm_backbone("vit_base_patch16_224.augreg_in21k", dict(tiny, global_pool=""), 8, 32)
    assert "gives features of shape (17, 32) per image, not one 32-d vector" in str(e.value)
    assert str(e.value).endswith("give model_kwargs global_pool token (the class token), avg or map")


def test_aper_classifies_by_the_cosine_to_prototypes_of_the_concatenated_ptm_and_adapted_features():
    """continual-reference.md, APER: the feature is concat(frozen PTM feature, adapted feature)
    (2d), each class's prototype the mean of the un-normalized concatenated features of its
    training images (test transform), and the prediction the cosine to the prototypes. Computed
    here from the network directly: a learner keeping the adapted half only, or scoring by the dot
    product with the un-normalized prototypes, gave other prototypes or other logits."""
    import torch.nn.functional as F

    from zeroflow.continual.runner import make_learner
    data, net = _Data(), _net()
    learner = make_learner(dict(CFG, method="aper"), net, torch.device("cpu"))
    for t, classes in enumerate(data.tasks):
        learner.learn_task(t, classes, data, _ctx())
    assert len(net.adapters) == 1                   # stage 0 only trains
    x, y = data.images("train_eval", range(4))
    net.eval()
    with torch.no_grad():
        ptm, adapted = net.features(x, None), net.features(x, 0)
    assert not torch.allclose(ptm, adapted)         # the trained adapter changes the feature
    f = torch.cat([ptm, adapted], dim=1)            # [N, 2d]
    protos = torch.stack([f[y == c].mean(0) for c in range(4)])
    assert learner.protos.shape == (4, 2 * net.dim)
    assert torch.allclose(learner.protos, protos, atol=1e-6)
    # the learner's logits of features given as it extracts them ([B, subspace, d], PTM first)
    got = learner.logits(torch.stack([ptm, adapted], dim=1))
    want = F.cosine_similarity(f[:, None, :], protos[None, :, :], dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, f @ protos.T)    # (the two scorings differ here)


def test_the_temporary_head_is_sigma_times_the_cosine_sigma_learnable_from_1():
    """continual-reference.md: the temporary head of EASE and APER is a cosine head,
    sigma * cos(f, w), sigma learnable with init 1; its weights uniform(+-1/sqrt(d)) (PILOT's
    CosineLinear). Computed with torch's cosine_similarity on rows of other norms: a head
    normalizing the features only scored sigma * |w| * cos."""
    import math

    import torch.nn.functional as F

    from zeroflow.continual.learners import CosineLinear
    torch.manual_seed(0)
    head = CosineLinear(16, 5)
    assert sorted(n for n, p in head.named_parameters() if p.requires_grad) == ["sigma", "weight"]
    assert head.sigma.tolist() == [1.0]
    bound = 1 / math.sqrt(16)
    assert 0.9 * bound < float(head.weight.detach().abs().max()) <= bound
    with torch.no_grad():
        head.weight.mul_(torch.arange(1.0, 6.0).unsqueeze(1))
        head.sigma.fill_(2.5)
    x = 3 * torch.randn(7, 16)
    want = 2.5 * F.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=-1)
    assert torch.allclose(head(x), want, atol=1e-6)


def test_an_adapter_starts_as_the_zero_function_with_a_kaiming_uniform_down_projection():
    """continual-reference.md, Adapter init: down-projection kaiming-uniform(a=sqrt 5), whose
    bound is 1/sqrt(fan_in); up-projection and biases zero (the adapted model starts equal to the
    pretrained one); output x 0.1, dropout 0.1."""
    import math

    from zeroflow.continual.backbones import Adapter
    torch.manual_seed(0)
    a = Adapter(768, 64)
    bound, w = 1 / math.sqrt(768), a.down.weight.detach()
    assert 0.99 * bound < float(w.abs().max()) <= bound
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.01 * bound       # uniform(-b, b)
    assert [float(t.detach().abs().max()) for t in (a.down.bias, a.up.weight, a.up.bias)] == [0.0, 0.0, 0.0]
    assert (a.scale, a.dropout.p) == (0.1, 0.1)


def test_an_adapter_runs_beside_each_blocks_mlp_on_the_residual_stream_after_attention():
    """continual-reference.md, Adapter: per block Linear d->r, ReLU, dropout, Linear r->d,
    output x 0.1, added in parallel with the block's MLP, fed with the residual stream after
    attention. Rebuilt here on timm's own forward of the ViT, with hooks that add the adapter,
    written out, to each block's MLP output (its input: what the block's norm2 takes)."""
    import torch.nn.functional as F
    net = _net()
    aset = net.add_adapter_set()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in aset.parameters():          # as trained: non-zero up-projection and biases
            p.normal_()
    after_attention, handles = {}, []

    def take(i):
        return lambda m, args: after_attention.__setitem__(i, args[0])

    def add(i):
        a = aset[i]
        return lambda m, args, out: out + 0.1 * (F.relu(after_attention[i] @ a.down.weight.T + a.down.bias)
                                                 @ a.up.weight.T + a.up.bias)
    for i, blk in enumerate(net.vit.blocks):
        handles += [blk.norm2.register_forward_pre_hook(take(i)), blk.mlp.register_forward_hook(add(i))]
    x = torch.rand(5, 3, 8, 8)
    net.eval()
    with torch.no_grad():
        want = net.vit(x)
        for h in handles:
            h.remove()
        got, plain = net.features(x, 0), net.features(x, None)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-2)


def test_the_backbone_is_frozen_and_in_eval_mode_and_the_adapters_take_the_nets_dropout():
    """The backbone's parameters never train and it runs in eval mode whatever mode the
    learner is set to (its own dropout off); an adapter set made by the network has the
    network's adapter dropout (0.9 here), active in train mode."""
    net = _net()
    aset = net.add_adapter_set()
    assert not any(p.requires_grad for p in net.vit.parameters())
    assert [a.dropout.p for a in aset] == [0.9, 0.9]
    net.train(True)
    assert not any(m.training for m in net.vit.modules())
    assert all(m.training for m in aset.modules())
