"""Pure-PyTorch reference of the ATS operator (shared/design/ATS-NOTES.md §1-§5).

Batched, differentiable (the sampled indices are constants for autograd) and the oracle for the
Triton kernels. Shapes: ``q, k, v`` are ``(B, H, T, dh)``; ``key_mask`` is ``(B, T)`` bool with
True for real tokens, or None when nothing is padded. The first ``num_prefix`` tokens (class token
first) are never scored and always kept.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..errors import ATSInputError

MIN_TOKENS = 8  # K_n = max(round(rho * N_in), 8), paper appendix E.1


class ATSResult(NamedTuple):
    out: torch.Tensor  # (B, H, T', dh): attention output of the kept rows only
    index: torch.Tensor  # (B, T') int64: kept rows, as positions in the input token set
    mask: torch.Tensor  # (B, T') bool: True for real tokens, False for padding
    kept: torch.Tensor  # (B,) int64: K', sampled tokens per image (prefix excluded)
    budget: torch.Tensor  # (B,) int64: K, the sampling budget of each image


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are computed in float32 whatever the model dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_token_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    scale: float,
    score: str = "attn_vnorm",
    strict: bool = True,
    bias: Optional[torch.Tensor] = None,
    with_bad: bool = False,
):
    """Significance score S (B, T) of every token, eq. 3 per head, summed over heads, normalised.
    With ``with_bad`` (and not ``strict``) returns ``(S, bad)``, ``bad`` (B,) True where the
    uniform fallback was used, so the caller can fold the check into one host read.

    ``bias`` (B|1, H|1, T, T) is an additive position bias of the attention logits (BEiT).

    Prefix and padded tokens score 0. With ``strict`` a score row that is not finite or sums to
    0 raises; otherwise it falls back to uniform scores over the real tokens.
    """
    dt = score_dtype(q.dtype)
    B, H, T, _ = k.shape
    logits = (q[:, :, :1].to(dt) @ k.to(dt).transpose(-2, -1)).squeeze(2) * scale  # (B, H, T)
    if bias is not None:
        logits = logits + bias[:, :, 0, :].to(dt)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    attn = logits.softmax(dim=-1)
    s = attn * v.to(dt).norm(dim=-1) if score == "attn_vnorm" else attn
    scored = _scored_tokens(B, T, num_prefix, key_mask, q.device)
    out, bad = _normalise(s.sum(dim=1) * scored, scored, strict)  # heads summed
    return (out, bad) if with_bad else out


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    bias: Optional[torch.Tensor] = None,
    mix: Optional[tuple] = None,
) -> torch.Tensor:
    """The attention matrix A (B, H, Tq, T) over the real keys, for the spellings that need it
    whole: talking heads (``mix = (w_l, b_l, w_w, b_w)``, linears across heads before and after
    the softmax, CaiT) and stages without a class token. Padded keys get weight exactly 0, also
    after the post-softmax head mixing (whose bias would otherwise give them weight)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if mix is not None:
        logits = _mix_heads(logits, mix[0], mix[1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    attn = logits.softmax(dim=-1)
    if mix is not None:
        attn = _mix_heads(attn, mix[2], mix[3])
        if key_mask is not None:
            attn = attn * key_mask[:, None, None, :].to(attn.dtype)
    return attn


def _mix_heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``Linear(H, H)`` across the head axis of (B, H, Tq, T), as talking-heads attention writes it."""
    return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def weight_scores(
    attn: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    score: str = "attn_vnorm",
    strict: bool = True,
    class_token: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores S (B, T) from a whole attention matrix ``attn`` (B, H, T, T): ``(S, bad)``.

    With a class token (the first prefix token; by default whenever there is a prefix), its row
    (eq. 3). Without one (CaiT's self-attention blocks, average-pool, register-only and SigLIP
    models) the mean row over the real queries, registers included, "attention received":
    S_j ∝ Σ_h mean_i |A_h[i, j]|·‖V_h,j‖ (docs/ats-semantics.md). Prefix tokens are never scored.
    ``bad`` (B,) marks rows that fell back to uniform; with ``strict`` they raise instead.
    """
    dt = score_dtype(attn.dtype)
    B, H, T, _ = attn.shape
    # |A|: talking heads mix the heads after the softmax, so a weight can be negative; the
    # contribution of token j to a head's output has magnitude |A_h[i, j]|·‖V_h,j‖ (= A for softmax).
    a = attn.to(dt).abs()
    if class_token is None:
        class_token = num_prefix > 0
    if class_token:
        row = a[:, :, 0, :]
    elif key_mask is None:
        row = a.mean(dim=2)
    else:
        queries = key_mask.to(dt)[:, None, :, None]
        row = (a * queries).sum(dim=2) / queries.sum(dim=2).clamp_min(1)
    s = row * v.to(dt).norm(dim=-1) if score == "attn_vnorm" else row
    scored = _scored_tokens(B, T, num_prefix, key_mask, attn.device)
    return _normalise(s.sum(dim=1) * scored, scored, strict)


def _normalise(s: torch.Tensor, scored: torch.Tensor, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """S / ΣS per image; a row that is not finite or sums to 0 raises (``strict``) or falls back
    to uniform scores over the scored tokens. Returns ``(S, bad)``."""
    denom = s.sum(dim=1, keepdim=True)
    bad = ~torch.isfinite(denom) | (denom <= 0)
    if strict and bool(bad.any()):
        raise bad_scores_error(bad.squeeze(1).nonzero().flatten().tolist())
    uniform = scored / scored.sum(dim=1, keepdim=True).clamp_min(1)
    out = torch.where(bad, uniform, s / torch.where(bad, torch.ones_like(denom), denom))
    return out, bad.squeeze(1)


def bad_scores_error(rows: list) -> ATSInputError:
    return ATSInputError(
        f"ATS scores of image(s) {rows} are not finite or sum to zero: the input or an activation "
        "holds NaN/inf, or the values are all zero. Check the input (torch.isfinite(x).all()) and "
        "the model weights."
    )


def _scored_tokens(B: int, T: int, num_prefix: int, key_mask, device) -> torch.Tensor:
    scored = torch.ones(B, T, dtype=torch.bool, device=device)
    scored[:, :num_prefix] = False
    if key_mask is not None:
        scored &= key_mask
    return scored


def token_budget(
    key_mask: Optional[torch.Tensor],
    batch: int,
    tokens: int,
    num_prefix: int,
    ratio: Optional[float],
    k: Optional[int],
    device: torch.device,
) -> torch.Tensor:
    """K per image (ATS-NOTES §3): max(round(rho * N_in), 8) or the given k, capped at N_in - p."""
    n_in = (
        key_mask.sum(dim=1)
        if key_mask is not None
        else torch.full((batch,), tokens, dtype=torch.int64, device=device)
    )
    n_scored = n_in - num_prefix
    if k is not None:
        budget = torch.full_like(n_in, k)
    else:
        budget = torch.floor(n_in.to(torch.float64) * ratio + 0.5).to(torch.int64).clamp_min(MIN_TOKENS)
    return torch.minimum(budget, n_scored)


def static_budget(tokens: int, num_prefix: int, ratio: Optional[float], k: Optional[int]) -> int:
    """The largest K any image can get from a tensor of ``tokens`` rows: the static padding size."""
    if k is not None:
        budget = k
    else:
        budget = max(int(tokens * ratio + 0.5), MIN_TOKENS)
    return max(min(budget, tokens - num_prefix), 0)


def inverse_transform_sample(
    scores: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    budget: torch.Tensor,
    num_prefix: int,
    out_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eqs. 4-5: K quantiles (2i-1)/2K of the CDF of S; each picks the first token reaching it.

    Returns ``(index, mask, kept)``: the kept positions (prefix first, then ascending original
    order, padding last), their mask and K'. ``out_tokens`` fixes T' (static padding); by default
    T' = max_b(K'_b + p), which reads K' on the host.
    """
    B, T = scores.shape
    device = scores.device
    cdf = scores.cumsum(dim=1)
    # K <= T - p always: searching T - p quantile slots needs no host read of max(K), and a
    # static width below some K still samples from all K quantiles (then truncates).
    k_max = max(T - num_prefix, 1)
    i = torch.arange(1, k_max + 1, device=device, dtype=scores.dtype)
    quantiles = (2 * i - 1) / (2 * budget.clamp_min(1).to(scores.dtype)[:, None])  # (B, k_max)
    # The first token whose CDF reaches each quantile: how many CDF entries lie below it (the CDF never
    # decreases). Written as a count, not torch.searchsorted, which Inductor (torch 2.11, triton 3.6)
    # fails to compile on CUDA when an exported model is packaged.
    picks = (cdf[:, None, :] < quantiles[:, :, None]).sum(dim=2)
    # Round-off can leave the last quantile above the CDF's end: clamp to the last real token.
    positions = torch.arange(T, device=device)
    real = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    last_real = torch.where(real, positions, 0).amax(dim=1, keepdim=True)
    picks = torch.minimum(picks, last_real)
    valid = i[None, :] <= budget[:, None]
    # Unused quantile slots point one past the end: with no prefix (CaiT) token 0 is scored like
    # any other and must not be kept by an unused slot.
    picks = torch.where(valid, picks, T)
    keep = torch.zeros(B, T + 1, dtype=torch.bool, device=device)
    keep.scatter_(1, picks, True)
    return compact(keep[:, :T], real, num_prefix, out_tokens)


def top_k_select(
    scores: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    budget: torch.Tensor,
    num_prefix: int,
    out_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's top-K baseline: keep each image's ``budget`` highest-scoring real tokens
    (ties broken by position). Same outputs and layout as :func:`inverse_transform_sample`."""
    B, T = scores.shape
    real = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=scores.device)
    ranked = scores.masked_fill(~real, float("-inf"))
    ranked[:, :num_prefix] = float("-inf")
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=scores.device).expand(B, T))
    if out_tokens == -1:  # the caller compacts (one host read for width, NaN flag and padding)
        return rank < budget[:, None], real
    return compact(rank < budget[:, None], real, num_prefix, out_tokens)


def compact(
    keep: torch.Tensor, real: torch.Tensor, num_prefix: int, out_tokens: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept tokens (B, T) bool -> (index, mask, K'): prefix first, then kept tokens in their
    original order, padding last; ``out_tokens`` rows, or max K'+p (a host read) when None."""
    keep = keep.clone()
    keep[:, :num_prefix] = True
    keep &= real
    kept = keep.sum(dim=1) - num_prefix
    if out_tokens is None:
        out_tokens = int(kept.max()) + num_prefix
    # Stable sort of "not kept" puts kept tokens first in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :out_tokens]
    mask = keep.gather(1, order)
    index = torch.where(mask, order, 0)  # padding rows copy the class token; they stay masked
    return index, mask, kept


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    dropout_p: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 6: O = A[kept] V, computing attention for the kept query rows only. ``bias``
    (B, L, T, T) is an additive position bias; its kept rows are gathered too."""
    B, H, _, dh = q.shape
    rows = q.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], dh))
    if bias is not None:
        L, T = bias.shape[1], bias.shape[-1]
        bias = bias.expand(B, -1, -1, -1).gather(2, index[:, None, :, None].expand(B, L, index.shape[1], T))
    return masked_attention(rows, k, v, key_mask, scale, dropout_p, bias)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, W) of ``x`` (B, H, T, dh) for each image: (B, H, W, dh)."""
    B, H, _, dh = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], dh))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    dropout_p: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over the real keys only (padded keys get zero weight);
    ``bias`` (B|1, L, Tq, Tk) is an additive position bias (``position_bias``)."""
    if bias is None:
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    else:
        attn_mask = bias.to(q.dtype)
        if key_mask is not None:
            attn_mask = attn_mask.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def position_bias(table: torch.Tensor, positions: Optional[torch.Tensor], batch: int,
                  rows: Optional[int] = None) -> torch.Tensor:
    """A position bias table (L, N, N) over the original tokens (L = heads, or 1) brought to each
    image's token set: (B, L, R, T) with ``out[b, l, i, j] = table[l, positions[b, i],
    positions[b, j]]``, for the first ``rows`` rows (all without; the class row: 1). ``positions``
    (B, T) are original positions, -1 for padding (read as 0; a key mask hides those keys), or
    None for the original tokens themselves (the table, not copied)."""
    if positions is None:
        out = table[None] if rows is None else table[None, :, :rows]
        return out.expand(batch, *out.shape[1:])
    idx = positions.clamp_min(0)
    query = idx if rows is None else idx[:, :rows]
    L, (B, R), T = table.shape[0], query.shape, idx.shape[1]
    out = table[:, query].gather(-1, idx[None, :, None, :].expand(L, B, R, T))  # (L, B, R, T)
    return out.transpose(0, 1)


def ats_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    *,
    num_prefix: int,
    scale: float,
    ratio: Optional[float] = None,
    k_tokens: Optional[int] = None,
    score: str = "attn_vnorm",
    padding: str = "batch_max",
    dropout_p: float = 0.0,
    strict: bool = True,
) -> ATSResult:
    """The whole ATS layer core: score, sample, and attend for the kept rows (ATS-NOTES §1-§5)."""
    B, H, T, _ = q.shape
    scores = class_token_scores(q, k, v, key_mask, num_prefix, scale, score, strict)
    budget = token_budget(key_mask, B, T, num_prefix, ratio, k_tokens, q.device)
    out_tokens = None
    if padding == "static":
        out_tokens = static_budget(T, num_prefix, ratio, k_tokens) + num_prefix
    index, mask, kept = inverse_transform_sample(scores, key_mask, budget, num_prefix, out_tokens)
    out = attention_rows(q, k, v, index, key_mask, scale, dropout_p)
    return ATSResult(out, index, mask, kept, budget)
