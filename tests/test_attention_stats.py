"""Tests for dleaf.attention_stats against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from dleaf.attention_stats import (
    HEAD_FOCUS_VARIANTS,
    LAYER_ENTROPY_VARIANTS,
    entropy,
    head_focus,
    image_mass,
    image_profile,
    layer_entropy,
)

# ---------------------------------------------------------------------------
# fixtures / brute-force references (plain Python loops, math.log)
# ---------------------------------------------------------------------------

B, H, Q, K = 4, 3, 5, 9


def _random_case(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, Q, K, generator=g, dtype=dtype) * 2.0
    attn = torch.softmax(logits, dim=-1)
    mask = torch.zeros(B, K, dtype=torch.bool)
    mask[0, 2:7] = True  # contiguous block
    mask[1, [0, 3, 8]] = True  # scattered
    mask[2, 4] = True  # a single image token
    mask[3, :] = True  # every key is an image token
    return attn, mask


def _bf_entropy(ps):
    return -sum(p * math.log(p) for p in ps if p > 0)


def _bf_stats(attn, mask):
    """Brute force: per (b, h, q) mass, profile, entropy; per (b, q) LIAE."""
    a = attn.tolist()
    mk = mask.tolist()
    nb, nh, nq, nk = attn.shape
    mass = [[[0.0] * nq for _ in range(nh)] for _ in range(nb)]
    prof = [[[[0.0] * nk for _ in range(nq)] for _ in range(nh)] for _ in range(nb)]
    ent = [[[0.0] * nq for _ in range(nh)] for _ in range(nb)]
    mixed = [[0.0] * nq for _ in range(nb)]
    mean_head = [[0.0] * nq for _ in range(nb)]
    n_img = [sum(1 for k in range(nk) if mk[b][k]) for b in range(nb)]
    for b in range(nb):
        for q in range(nq):
            mix = [0.0] * nk
            for h in range(nh):
                m = 0.0
                for k in range(nk):
                    if mk[b][k]:
                        m += a[b][h][q][k]
                mass[b][h][q] = m
                for k in range(nk):
                    prof[b][h][q][k] = a[b][h][q][k] / m if (mk[b][k] and m > 0) else 0.0
                    mix[k] += prof[b][h][q][k] / nh
                ent[b][h][q] = _bf_entropy(prof[b][h][q])
            mixed[b][q] = _bf_entropy(mix)
            mean_head[b][q] = sum(ent[b][h][q] for h in range(nh)) / nh
    return dict(
        mass=mass, prof=prof, ent=ent, mixed=mixed, mean_head=mean_head, n_img=n_img
    )


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------
# against brute force
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_brute_force(dtype):
    attn, mask = _random_case(dtype)
    ref = _bf_stats(attn.double(), mask)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)

    m = image_mass(attn, mask)
    assert m.shape == (B, H, Q) and m.dtype == dtype
    torch.testing.assert_close(m.double(), _t(ref["mass"]), **tol)

    p = image_profile(attn, mask)
    assert p.shape == (B, H, Q, K) and p.dtype == dtype
    torch.testing.assert_close(p.double(), _t(ref["prof"]), **tol)
    torch.testing.assert_close(p.sum(-1).double(), torch.ones(B, H, Q, dtype=torch.float64), **tol)

    torch.testing.assert_close(entropy(p).double(), _t(ref["ent"]), **tol)

    mixed = layer_entropy(attn, mask, "mixed")
    mean_head = layer_entropy(attn, mask, "mean_head")
    assert mixed.shape == (B, Q) and mean_head.shape == (B, Q)
    torch.testing.assert_close(mixed.double(), _t(ref["mixed"]), **tol)
    torch.testing.assert_close(mean_head.double(), _t(ref["mean_head"]), **tol)

    n_img = ref["n_img"]
    for variant, key in [("mixed", "mixed"), ("mean_head", "mean_head")]:
        norm = layer_entropy(attn, mask, variant, normalize=True).double()
        exp = [
            [ref[key][b][q] / math.log(n_img[b]) if n_img[b] > 1 else 0.0 for q in range(Q)]
            for b in range(B)
        ]
        torch.testing.assert_close(norm, _t(exp), **tol)

    torch.testing.assert_close(head_focus(attn, mask, "mass").double(), _t(ref["mass"]), **tol)
    focus = head_focus(attn, mask, "focus")
    assert focus.shape == (B, H, Q)
    exp_focus = [
        [
            [
                ref["mass"][b][h][q]
                * (1.0 - (ref["ent"][b][h][q] / math.log(n_img[b]) if n_img[b] > 1 else 0.0))
                for q in range(Q)
            ]
            for h in range(H)
        ]
        for b in range(B)
    ]
    torch.testing.assert_close(focus.double(), _t(exp_focus), **tol)


def test_single_image_token_sample():
    attn, mask = _random_case()
    b = 2  # exactly one image token
    assert int(mask[b].sum()) == 1
    p = image_profile(attn, mask)[b]
    assert torch.equal(p[..., 4], torch.ones(H, Q, dtype=attn.dtype))
    assert torch.all(layer_entropy(attn, mask, "mixed")[b] == 0)
    assert torch.all(layer_entropy(attn, mask, "mean_head", normalize=True)[b] == 0)
    torch.testing.assert_close(head_focus(attn, mask, "focus")[b], image_mass(attn, mask)[b])


def test_all_keys_image_mass_is_one():
    attn, mask = _random_case()
    torch.testing.assert_close(image_mass(attn, mask)[3], torch.ones(H, Q, dtype=attn.dtype))


# ---------------------------------------------------------------------------
# hand-worked example: 2 heads, 1 query, 4 keys, image keys {1, 2, 3}
#   head 0: a = [0.2, 0.4, 0.4, 0.0]  -> m = 0.8, p = [0, .5, .5, 0], H = log 2
#   head 1: a = [0.5, 0.5, 0.0, 0.0]  -> m = 0.5, p = [0, 1, 0, 0],   H = 0
#   mixture p = [0, .75, .25, 0]       -> H = -(.75 log .75 + .25 log .25)
# ---------------------------------------------------------------------------


def _hand_case():
    attn = torch.tensor(
        [[[0.2, 0.4, 0.4, 0.0]], [[0.5, 0.5, 0.0, 0.0]]], dtype=torch.float64
    )  # (H=2, Q=1, K=4)
    mask = torch.tensor([False, True, True, True])
    return attn, mask


def test_hand_example():
    attn, mask = _hand_case()
    torch.testing.assert_close(image_mass(attn, mask), _t([[0.8], [0.5]]))
    torch.testing.assert_close(
        image_profile(attn, mask), _t([[[0.0, 0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0, 0.0]]])
    )
    mixed = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mixed == pytest.approx(0.5623351446188083, abs=1e-15)
    torch.testing.assert_close(layer_entropy(attn, mask, "mixed"), _t([mixed]))
    torch.testing.assert_close(layer_entropy(attn, mask, "mean_head"), _t([math.log(2) / 2]))
    torch.testing.assert_close(
        layer_entropy(attn, mask, "mixed", normalize=True), _t([mixed / math.log(3)])
    )
    torch.testing.assert_close(
        layer_entropy(attn, mask, "mean_head", normalize=True),
        _t([math.log(2) / 2 / math.log(3)]),
    )
    torch.testing.assert_close(
        head_focus(attn, mask, "focus"),
        _t([[0.8 * (1 - math.log(2) / math.log(3))], [0.5]]),
    )
    torch.testing.assert_close(head_focus(attn, mask), _t([[0.8], [0.5]]))


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------


def test_mixed_ge_mean_head_concavity():
    for seed in range(5):
        attn, mask = _random_case(seed=seed)
        mixed = layer_entropy(attn, mask, "mixed")
        mean_head = layer_entropy(attn, mask, "mean_head")
        assert torch.all(mixed >= mean_head - 1e-12)
        # strictly larger somewhere (heads differ)
        assert torch.any(mixed > mean_head + 1e-6)


@pytest.mark.parametrize("variant", LAYER_ENTROPY_VARIANTS)
def test_normalized_in_unit_interval(variant):
    for seed in range(5):
        attn, mask = _random_case(seed=seed)
        # also very peaked / very flat attention
        for scale in (0.01, 1.0, 20.0):
            a = torch.softmax(torch.log(attn) * scale, dim=-1)
            v = layer_entropy(a, mask, variant, normalize=True)
            assert torch.all(v >= -1e-12) and torch.all(v <= 1 + 1e-12)
            f = head_focus(a, mask, "focus")
            m = image_mass(a, mask)
            assert torch.all(f >= -1e-12) and torch.all(f <= m + 1e-12)


def test_uniform_attention_over_image_gives_log_n():
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, False, False, False]])
    n = mask.sum(-1)  # 4, 2
    attn = torch.zeros(2, 3, 2, 6, dtype=torch.float64)
    for b in range(2):
        attn[b, ..., mask[b]] = 0.9 / n[b]  # 0.9 spread uniformly over I
        attn[b, ..., ~mask[b]] = 0.1 / (~mask[b]).sum()
    for variant in LAYER_ENTROPY_VARIANTS:
        v = layer_entropy(attn, mask, variant)
        torch.testing.assert_close(v, torch.log(n.double())[:, None].expand(2, 2))
        torch.testing.assert_close(
            layer_entropy(attn, mask, variant, normalize=True), torch.ones(2, 2, dtype=torch.float64)
        )
    torch.testing.assert_close(head_focus(attn, mask, "focus"), torch.zeros(2, 3, 2, dtype=torch.float64))


def test_entropy_zero_log_zero_and_dim():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(entropy(p), _t([0.0, math.log(2)]))
    torch.testing.assert_close(entropy(p.T, dim=0), _t([0.0, math.log(2)]))
    assert entropy(torch.zeros(3)).item() == 0.0


def test_zero_image_mass_gives_zero_profile_and_finite_grad():
    attn = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)
    mask = torch.tensor([False, False, True, True])
    attn.requires_grad_(True)
    p = image_profile(attn, mask)
    assert torch.equal(p[0, 0].detach(), torch.zeros(4, dtype=torch.float64))
    out = layer_entropy(attn, mask, "mixed").sum() + head_focus(attn, mask, "focus").sum()
    (g,) = torch.autograd.grad(out, attn)
    assert torch.all(torch.isfinite(g))


def test_check_false_empty_sample_gives_zeros_no_nan():
    attn, mask = _random_case()
    mask = mask.clone()
    mask[1] = False
    for variant in LAYER_ENTROPY_VARIANTS:
        v = layer_entropy(attn, mask, variant, normalize=True, check=False)
        assert torch.all(v[1] == 0) and torch.all(torch.isfinite(v))
    assert torch.all(head_focus(attn, mask, "focus", check=False)[1] == 0)


def test_broadcast_mask_and_extra_leading_dims():
    g = torch.Generator().manual_seed(3)
    attn = torch.softmax(torch.randn(2, 3, H, Q, K, generator=g, dtype=torch.float64), -1)
    mask3 = torch.rand(3, K, generator=g) < 0.5
    mask3[:, 0] = True
    full = mask3.expand(2, 3, K)
    for fn in (image_mass, image_profile):
        torch.testing.assert_close(fn(attn, mask3), fn(attn, full))
    for variant in LAYER_ENTROPY_VARIANTS:
        a = layer_entropy(attn, mask3, variant, normalize=True)
        assert a.shape == (2, 3, Q)
        torch.testing.assert_close(a, layer_entropy(attn, full, variant, normalize=True))
    for variant in HEAD_FOCUS_VARIANTS:
        torch.testing.assert_close(head_focus(attn, mask3, variant), head_focus(attn, full, variant))
    # a single (K,) mask shared by all samples; also the no-batch (H, Q, K) case
    shared = mask3[0]
    torch.testing.assert_close(image_mass(attn, shared), image_mass(attn, shared.expand(2, 3, K)))
    assert layer_entropy(attn[0, 0], shared).shape == (Q,)


def test_inputs_not_modified():
    attn, mask = _random_case()
    a0, m0 = attn.clone(), mask.clone()
    for variant in LAYER_ENTROPY_VARIANTS:
        layer_entropy(attn, mask, variant, normalize=True)
    for variant in HEAD_FOCUS_VARIANTS:
        head_focus(attn, mask, variant)
    assert torch.equal(attn, a0) and torch.equal(mask, m0)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


def _grad_case():
    g = torch.Generator().manual_seed(7)
    attn = torch.softmax(torch.randn(2, 2, 2, 5, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, True, False]])
    return attn.requires_grad_(True), mask


@pytest.mark.parametrize("variant", LAYER_ENTROPY_VARIANTS)
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_layer_entropy(variant, normalize):
    attn, mask = _grad_case()
    assert torch.autograd.gradcheck(
        lambda a: layer_entropy(a, mask, variant, normalize=normalize), (attn,)
    )


@pytest.mark.parametrize("variant", HEAD_FOCUS_VARIANTS)
def test_gradcheck_head_focus(variant):
    attn, mask = _grad_case()
    assert torch.autograd.gradcheck(lambda a: head_focus(a, mask, variant), (attn,))


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def test_bad_inputs():
    attn, mask = _random_case()
    with pytest.raises(TypeError, match="attn must be a torch.Tensor"):
        image_mass(attn.numpy(), mask)
    with pytest.raises(TypeError, match="image_mask must be a torch.Tensor"):
        image_mass(attn, mask.tolist())
    with pytest.raises(TypeError, match="floating-point"):
        image_mass((attn * 10).long(), mask)
    with pytest.raises(TypeError, match="torch.bool"):
        image_mass(attn, mask.int())
    with pytest.raises(ValueError, match="at least 3 dims"):
        image_mass(attn[0, 0], mask[0])
    with pytest.raises(ValueError, match="at least 1 dim"):
        image_mass(attn, torch.tensor(True))
    with pytest.raises(ValueError, match=r"image_mask last dim \(8\) must equal the number of keys K=9"):
        image_profile(attn, mask[:, :8])
    with pytest.raises(ValueError, match="leading dims"):
        layer_entropy(attn, mask[:3])
    with pytest.raises(ValueError, match="leading dims"):
        layer_entropy(attn, mask.expand(2, B, K))
    empty = mask.clone()
    empty[1] = False
    for fn in (image_mass, image_profile, layer_entropy, head_focus):
        with pytest.raises(ValueError, match="image_mask has no image positions for sample 1"):
            fn(attn, empty)
    with pytest.raises(ValueError, match=r"no image positions for sample \(1, 0\)"):
        image_mass(attn.expand(2, B, H, Q, K), torch.stack([mask, empty.roll(-1, 0)]))
    with pytest.raises(ValueError, match=r"unknown variant 'max'.*'mixed', 'mean_head'"):
        layer_entropy(attn, mask, "max")
    with pytest.raises(ValueError, match=r"unknown variant 'entropy'.*'mass', 'focus'"):
        head_focus(attn, mask, "entropy")
    with pytest.raises(TypeError, match="p must be a torch.Tensor"):
        entropy([0.5, 0.5])
    with pytest.raises(ValueError, match="at least 1 dim"):
        entropy(torch.tensor(1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_with_check_false():
    attn, mask = _random_case(torch.float32)
    attn, mask = attn.cuda(), mask.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for variant in LAYER_ENTROPY_VARIANTS:
            layer_entropy(attn, mask, variant, normalize=True, check=False)
        for variant in HEAD_FOCUS_VARIANTS:
            head_focus(attn, mask, variant, check=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
