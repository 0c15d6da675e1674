"""Statistics of decoder attention over image tokens.

All functions are pure tensor functions (torch): they never modify their
inputs in place, work in float32 and float64, are differentiable under
autograd and, apart from the optional ``check=True`` validation, never force a
host/device synchronisation.

Notation
--------
``attn``
    Post-softmax attention of shape ``(..., H, Q, K)``: arbitrary leading
    (batch) dimensions, ``H`` heads, ``Q`` query rows and ``K`` keys.  Entry
    ``a[h, q, k]`` is the attention that query ``q`` of head ``h`` pays to
    key ``k``.
``image_mask``
    Bool tensor of shape ``(..., K)``: one mask per sample over the keys,
    ``True`` where the key is an image token.  Its leading dimensions must
    broadcast to the leading dimensions of ``attn`` (``attn.shape[:-3]``);
    a plain ``(K,)`` mask is shared by every sample.
``I``
    The set of image positions of a sample and ``|I|`` its size (per sample).

Conventions for degenerate cases
--------------------------------
* A query row whose image mass ``m`` is zero (or ``<= eps``) has an all-zero
  image profile, hence an entropy of 0.
* ``0 log 0 = 0``; entropies use the natural logarithm.  The gradient of
  ``p log p`` at ``p = 0`` is taken to be 0 (instead of ``-inf``).
* Normalised entropies divide by ``log |I|``; when ``|I| == 1`` this is
  ``0 / 0`` and the normalised value is defined as 0 (a single image token is
  perfectly focused).
* A sample with no image position at all is an error when ``check=True``
  (the default).  With ``check=False`` it is not detected: its profile is all
  zeros and every entropy / normalised entropy of it is 0.
"""

from __future__ import annotations

import torch

__all__ = [
    "LAYER_ENTROPY_VARIANTS",
    "HEAD_FOCUS_VARIANTS",
    "image_mass",
    "image_profile",
    "entropy",
    "layer_entropy",
    "head_focus",
]

LAYER_ENTROPY_VARIANTS = ("mixed", "mean_head")
HEAD_FOCUS_VARIANTS = ("mass", "focus")


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _validate(attn: torch.Tensor, image_mask: torch.Tensor, check: bool) -> None:
    """Validate ``attn`` / ``image_mask``; only ``check=True`` synchronises."""
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if not isinstance(image_mask, torch.Tensor):
        raise TypeError(
            f"image_mask must be a torch.Tensor, got {type(image_mask).__name__}"
        )
    if not attn.is_floating_point():
        raise TypeError(f"attn must have a floating-point dtype, got {attn.dtype}")
    if image_mask.dtype != torch.bool:
        raise TypeError(f"image_mask must have dtype torch.bool, got {image_mask.dtype}")
    if attn.dim() < 3:
        raise ValueError(
            "attn must have at least 3 dims (..., H, Q, K), "
            f"got shape {tuple(attn.shape)}"
        )
    if image_mask.dim() < 1:
        raise ValueError("image_mask must have at least 1 dim (..., K), got a 0-d tensor")
    k = attn.shape[-1]
    if image_mask.shape[-1] != k:
        raise ValueError(
            f"image_mask last dim ({image_mask.shape[-1]}) must equal the number "
            f"of keys K={k} of attn (shape {tuple(attn.shape)})"
        )
    lead = tuple(attn.shape[:-3])
    mask_lead = tuple(image_mask.shape[:-1])
    try:
        ok = tuple(torch.broadcast_shapes(mask_lead, lead)) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"image_mask shape {tuple(image_mask.shape)} does not match attn shape "
            f"{tuple(attn.shape)}: its leading dims {mask_lead} must broadcast to "
            f"attn's batch dims {lead}"
        )
    if image_mask.device != attn.device:
        raise ValueError(
            f"image_mask is on {image_mask.device} but attn is on {attn.device}"
        )
    if check:
        empty = ~image_mask.any(dim=-1)  # shape mask_lead
        if bool(empty.any()):
            idx = torch.nonzero(empty)[0].tolist()
            where = tuple(idx) if len(idx) != 1 else idx[0]
            raise ValueError(
                f"image_mask has no image positions for sample {where} "
                f"(image_mask shape {tuple(image_mask.shape)})"
            )


def _check_variant(variant: str, valid: tuple[str, ...]) -> None:
    if variant not in valid:
        raise ValueError(
            f"unknown variant {variant!r}; valid variants are: "
            + ", ".join(repr(v) for v in valid)
        )


def _num_image(image_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|I| per sample, shape ``image_mask.shape[:-1]``, in ``dtype``."""
    return image_mask.sum(dim=-1).to(dtype)


def _inv_log_num_image(n: torch.Tensor) -> torch.Tensor:
    """``1 / log n`` where ``n > 1``, else 0 (defines the |I| <= 1 case)."""
    big = n > 1
    safe = torch.where(big, n, torch.full_like(n, 2.0))
    return torch.where(big, 1.0 / torch.log(safe), torch.zeros_like(n))


def _mask_for_attn(image_mask: torch.Tensor) -> torch.Tensor:
    """Insert the H and Q dims: ``(..., K)`` -> ``(..., 1, 1, K)``."""
    return image_mask.unsqueeze(-2).unsqueeze(-2)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def image_mass(
    attn: torch.Tensor, image_mask: torch.Tensor, *, check: bool = True
) -> torch.Tensor:
    r"""Attention mass on image tokens.

    Formula: ``m[..., h, q] = sum_{i in I} a[..., h, q, i]``.

    Args:
        attn: post-softmax attention ``(..., H, Q, K)``.
        image_mask: bool ``(..., K)``, True at image-token keys.
        check: if True (default), raise ``ValueError`` for a sample without
            image positions (this needs one host synchronisation).

    Returns:
        Tensor of shape ``(..., H, Q)``.
    """
    _validate(attn, image_mask, check)
    mask = _mask_for_attn(image_mask)
    zero = torch.zeros((), dtype=attn.dtype, device=attn.device)
    return torch.where(mask, attn, zero).sum(dim=-1)


def image_profile(
    attn: torch.Tensor,
    image_mask: torch.Tensor,
    eps: float = 0.0,
    *,
    check: bool = True,
) -> torch.Tensor:
    r"""Attention renormalised over the image tokens.

    Formula: ``p[..., h, q, i] = a[..., h, q, i] / m[..., h, q]`` for ``i`` in
    ``I`` and ``0`` for non-image keys, with ``m`` the :func:`image_mass`.

    Where ``m <= eps`` (in particular ``m == 0``) the profile row is all
    zeros instead of ``0/0``; the division is guarded so that gradients stay
    finite there too.  Otherwise each profile row sums to 1 over ``I``.

    Args:
        attn: post-softmax attention ``(..., H, Q, K)``.
        image_mask: bool ``(..., K)``, True at image-token keys.
        eps: rows with image mass ``<= eps`` get a zero profile (default 0).
        check: see :func:`image_mass`.

    Returns:
        Tensor of shape ``(..., H, Q, K)``.
    """
    _validate(attn, image_mask, check)
    mask = _mask_for_attn(image_mask)
    zero = torch.zeros((), dtype=attn.dtype, device=attn.device)
    masked = torch.where(mask, attn, zero)
    m = masked.sum(dim=-1, keepdim=True)
    ok = m > eps
    safe_m = torch.where(ok, m, torch.ones_like(m))
    return torch.where(ok, masked / safe_m, zero)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Shannon entropy (natural log) along ``dim``.

    Formula: ``H(p) = - sum_k p[k] log p[k]`` with ``0 log 0 = 0``.

    Entries ``<= 0`` contribute 0 (and have zero gradient).  ``p`` is not
    required to sum to 1 (e.g. an all-zero profile has entropy 0).

    Returns:
        ``p`` with ``dim`` reduced.
    """
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"p must be a torch.Tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"p must have a floating-point dtype, got {p.dtype}")
    if p.dim() == 0:
        raise ValueError("p must have at least 1 dim, got a 0-d tensor")
    pos = p > 0
    safe = torch.where(pos, p, torch.ones_like(p))
    plogp = torch.where(pos, p * torch.log(safe), torch.zeros_like(p))
    return -plogp.sum(dim=dim)


def layer_entropy(
    attn: torch.Tensor,
    image_mask: torch.Tensor,
    variant: str = "mixed",
    normalize: bool = False,
    *,
    check: bool = True,
) -> torch.Tensor:
    r"""Layer image-attention entropy (LIAE) per query row.

    With ``p[h]`` the :func:`image_profile` of head ``h`` (over keys, for a
    fixed query row):

    * ``variant="mixed"``:  ``LIAE = H( (1/H) sum_h p[h] )``, the entropy of the
      head-mixed profile;
    * ``variant="mean_head"``: ``LIAE = (1/H) sum_h H(p[h])``, the mean of the
      per-head entropies.

    By concavity of the entropy, ``mixed >= mean_head``.  Both lie in
    ``[0, log|I|]``.  With ``normalize=True`` the value is divided by
    ``log|I|`` (``|I|`` taken per sample) so that it lies in ``[0, 1]``; when
    ``|I| == 1`` the normalised value is defined as 0.  A head with zero image
    mass has an all-zero profile (it contributes nothing to the mixture and
    entropy 0 to the mean).

    Args:
        attn: post-softmax attention ``(..., H, Q, K)``.
        image_mask: bool ``(..., K)``, True at image-token keys.
        variant: ``"mixed"`` or ``"mean_head"``.
        normalize: divide by ``log|I|``.
        check: see :func:`image_mass`.

    Returns:
        Tensor of shape ``(..., Q)``.
    """
    _check_variant(variant, LAYER_ENTROPY_VARIANTS)
    p = image_profile(attn, image_mask, check=check)
    if variant == "mixed":
        out = entropy(p.mean(dim=-3), dim=-1)  # (..., Q)
    else:
        out = entropy(p, dim=-1).mean(dim=-2)  # (..., H, Q) -> (..., Q)
    if normalize:
        inv = _inv_log_num_image(_num_image(image_mask, attn.dtype))  # mask lead
        out = out * inv.unsqueeze(-1)
    return out


def head_focus(
    attn: torch.Tensor,
    image_mask: torch.Tensor,
    variant: str = "mass",
    *,
    check: bool = True,
) -> torch.Tensor:
    r"""Per-head image-attention focus (IAF) per query row.

    * ``variant="mass"``:  ``IAF[h] = m[h]``, the :func:`image_mass`;
    * ``variant="focus"``: ``IAF[h] = m[h] * (1 - H(p[h]) / log|I|)``, i.e. the
      image mass times one minus the normalised entropy of the head's
      :func:`image_profile`.  When ``|I| == 1`` the normalised entropy is
      defined as 0, so ``focus == mass``.  In exact arithmetic
      ``0 <= focus <= mass``.

    Args:
        attn: post-softmax attention ``(..., H, Q, K)``.
        image_mask: bool ``(..., K)``, True at image-token keys.
        variant: ``"mass"`` or ``"focus"``.
        check: see :func:`image_mass`.

    Returns:
        Tensor of shape ``(..., H, Q)``.
    """
    _check_variant(variant, HEAD_FOCUS_VARIANTS)
    _validate(attn, image_mask, check)
    mass = image_mass(attn, image_mask, check=False)
    if variant == "mass":
        return mass
    p = image_profile(attn, image_mask, check=False)
    inv = _inv_log_num_image(_num_image(image_mask, attn.dtype))  # mask lead
    h_norm = entropy(p, dim=-1) * inv.unsqueeze(-1).unsqueeze(-1)  # (..., H, Q)
    return mass * (1.0 - h_norm)

