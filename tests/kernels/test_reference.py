"""The reference itself, held to the formulas of docs/architecture.md section "Losses" computed
step by step in float64 with plain Python loops (no torch reductions): the oracle every kernel test
trusts needs an oracle of its own (issue 11, point 8)."""
from __future__ import annotations

import math

import pytest
import torch

from zreward_fast import reference

LEVELS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
UNEVEN = [0.0, 1.0, 1.5, 3.0, 4.0, 6.0, 10.0]


def _log_softmax(z: list[float]) -> list[float]:
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def _close(got: torch.Tensor, want: float | list, tol: float = 2e-6) -> None:
    g = got.detach().double().flatten().tolist()
    w = want if isinstance(want, list) else [want]
    assert len(g) == len(w)
    for a, b in zip(g, w):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (a, b)


@pytest.mark.parametrize("levels,temperature", [(LEVELS, 1.0), (UNEVEN, 0.7)])
def test_score_head_mean_variance_entropy(levels, temperature):
    g = torch.Generator().manual_seed(0)
    N, H, V, K = 5, 6, 20, len(levels)
    hidden, weight, bias = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    ids = torch.randperm(V, generator=g)[:K]
    out = reference.score_head(hidden, weight, ids, torch.tensor(levels), bias, temperature)
    for n in range(N):
        z = [(sum(hidden[n, h].item() * weight[ids[k], h].item() for h in range(H)) + bias[ids[k]].item()) / temperature
             for k in range(K)]
        lp = _log_softmax(z)
        p = [math.exp(v) for v in lp]
        mu = sum(pk * s for pk, s in zip(p, levels))
        _close(out.logits[n], z, 1e-5)
        _close(out.probs[n], p)
        _close(out.mean[n], mu, 1e-5)
        _close(out.var[n], sum(pk * (s - mu) ** 2 for pk, s in zip(p, levels)), 1e-5)
        _close(out.entropy[n], -sum(pk * lk for pk, lk in zip(p, lp)), 1e-5)


def _gdso_by_hand(z, t, levels, a_pt, a_pw, l_pt, l_pw, eps):
    """docs/architecture.md's formulas, one term at a time."""
    P, G, K = len(z), len(z[0][0]), len(levels)
    R = levels[-1] - levels[0]
    loss_pt = loss_pw = 0.0
    rewards, advs, mus = [], [], []
    for p in range(P):
        lp = [[_log_softmax(z[p][j][i]) for i in range(G)] for j in range(2)]
        mu = [[sum(math.exp(lp[j][i][k]) * levels[k] for k in range(K)) for i in range(G)] for j in range(2)]
        s = t[p]
        r_inst, a_inst = [], []
        pt = pw = 0.0
        for j in range(2):
            jb = 1 - j
            r_side = []
            for i in range(G):
                r_pt = 1 - abs(mu[j][i] - s[j]) / R
                dsum = sum(abs((mu[j][i] - mu[jb][k]) - (s[j] - s[jb])) for k in range(G))
                r_pw = 1 - dsum / (G * R)
                r_side.append(l_pt * r_pt + l_pw * r_pw)
                pw += dsum
                b = min(range(K), key=lambda k: (abs(s[j] - levels[k]), k))  # nearest, ties low
                pt += -lp[j][i][b]
            m = sum(r_side) / G
            sd = math.sqrt(sum((r - m) ** 2 for r in r_side) / (G - 1))  # unbiased
            r_inst.append(r_side)
            a_inst.append([(r - m) / (sd + eps) for r in r_side])
        loss_pt += pt / (2 * G)
        loss_pw += pw / (2 * G * G * R)
        rewards.append(r_inst)
        advs.append(a_inst)
        mus.append(mu)
    loss_pt, loss_pw = loss_pt / P, loss_pw / P
    return a_pt * loss_pt + a_pw * loss_pw, loss_pt, loss_pw, rewards, advs, mus


@pytest.mark.parametrize("levels", [LEVELS, UNEVEN])
def test_gdso_losses_rewards_and_advantages(levels):
    g = torch.Generator().manual_seed(1)
    P, G, K = 3, 4, len(levels)
    z = 2.0 * torch.randn(P, 2, G, K, generator=g)
    lo, hi = levels[0], levels[-1]
    t = lo + (hi - lo) * torch.rand(P, 2, generator=g)
    t[0] = torch.tensor([levels[2], levels[1]])  # targets exactly on levels
    t[1, 0] = (levels[3] + levels[4]) / 2  # half-way: the lower level
    hp = dict(alpha_pt=0.7, alpha_pw=1.3, lambda_pt=0.3, lambda_pw=0.7, eps=1e-3)
    out = reference.gdso_loss(z, t, torch.tensor(levels), **hp)
    want = _gdso_by_hand(z.double().tolist(), t.double().tolist(), levels, *hp.values())
    for name, got, w in zip(("loss", "loss_pt", "loss_pw", "rewards", "advantages", "mean"), out, want):
        flat = w if not isinstance(w, list) else [x for a in w for b in a for x in b]
        _close(got, flat, 2e-5 if name == "advantages" else 2e-6)


@pytest.mark.parametrize("with_old,beta", [(True, 0.04), (True, 0.0), (False, 0.3)])
def test_grpo_clipped_ratio_and_k3_kl(with_old, beta):
    g = torch.Generator().manual_seed(2)
    B, T, H, V, clip, temp = 3, 5, 4, 11, 0.2, 0.9
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # the last row is empty
    adv = torch.tensor([1.3, -0.8, 2.0])
    # old log-probs far enough from the current ones that some ratios leave [1-eps, 1+eps] both ways
    old = torch.log(torch.rand(B, T, generator=g) * 0.5 + 0.01) if with_old else None
    ref = torch.log(torch.rand(B, T, generator=g) * 0.5 + 0.01)
    loss, lp = reference.grpo_token_loss(hidden, weight, tokens, mask, adv, old, ref, clip_eps=clip, beta=beta,
                                         temperature=temp)
    rows, clipped = [], 0
    for b in range(B):
        num = 0.0
        for t in range(T):
            z = [sum(hidden[b, t, h].item() * weight[v, h].item() for h in range(H)) / temp for v in range(V)]
            lpt = _log_softmax(z)[tokens[b, t]]
            _close(lp[b, t], lpt, 1e-5)
            ratio = math.exp(lpt - (old[b, t].item() if with_old else lpt))
            a = adv[b].item()
            clipped_ratio = min(max(ratio, 1 - clip), 1 + clip)
            clipped += mask[b, t].item() and clipped_ratio != ratio
            l_t = -min(ratio * a, clipped_ratio * a)
            d = ref[b, t].item() - lpt
            l_t += beta * (math.exp(d) - d - 1)
            num += mask[b, t].item() * l_t
        rows.append(num / max(1, sum(mask[b].tolist())))
    _close(loss, sum(rows) / B, 1e-5)
    assert clipped > 0 or not with_old  # the clip branch was exercised


def test_risd_kl_with_zero_teacher_mass():
    g = torch.Generator().manual_seed(3)
    N, H, V, K = 4, 5, 13, 9
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ids = torch.arange(2, 2 + K)
    qt = torch.softmax(torch.randn(N, K, generator=g), -1)
    qt[0, :4] = 0.0  # 0 log 0 = 0
    qt[0] /= qt[0].sum()
    qt[1] = torch.nn.functional.one_hot(torch.tensor(6), K).float()
    got = reference.risd_loss(hidden, weight, ids, qt, reduction="none")
    want = []
    for n in range(N):
        lq = _log_softmax([sum(hidden[n, h].item() * weight[ids[k], h].item() for h in range(H)) for k in range(K)])
        want.append(sum(p * (math.log(p) - lq[k]) for k, p in enumerate(qt[n].tolist()) if p > 0))
    _close(got, want, 1e-5)
    _close(reference.risd_loss(hidden, weight, ids, qt), sum(want) / N, 1e-5)
