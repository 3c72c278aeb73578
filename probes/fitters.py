"""Two fitters of the same probe, `StandardScaler -> LogisticRegression(C, class_weight=
"balanced")` (L2, unpenalised intercept; binary tasks use one logit like scikit-learn):

- `fit_predict_torch` (default): for each layer (or chunk of layers), every fold, every task
  (3-way and pairs) and its shuffled control are fitted *at once* as one block-separable
  objective with full-batch L-BFGS in float32. Each fold's test rows get weight 0 and
  standardisation is folded into the weights (logits = x @ (W / sd) + b - (mu / sd) @ W), so one
  pass over the raw activations serves all folds and tasks, each with its own train statistics.
  One layer per L-BFGS run is the default: measured faster than stacking layers, whose joint
  line search needs more evaluations.
- `fit_predict_sklearn`: the reference, one `Pipeline` per layer x task x fold (slow; for
  checking).

Both return test-row probabilities as [fold][task][variant] -> [L, n_test, k].
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from probes.tasks import TaskFold

Fold = tuple[np.ndarray, np.ndarray]
"""(train rows, test rows) of one fold."""


def fit_predict_torch(x: Float[torch.Tensor, "L n d"], folds: Sequence[Fold],
                      plans: list[list[TaskFold]], C: float, max_iter: int,
                      num_threads: int | None = None) -> list[list[dict]]:
    """Fit every (fold, task, variant) probe for every layer of the chunk jointly on the full
    activations (each fold's test rows get weight 0), so one pass over `x` serves all folds;
    return probabilities on each task's test rows: [fold][task][variant] -> [L, n_test, k]."""
    prev = torch.get_num_threads()
    small = x.numel() < 2e6  # per-op overhead dominates; extra threads only contend
    torch.set_num_threads(num_threads or (1 if small else prev))
    try:
        return _fit_jointly(x, folds, plans, C, max_iter)
    finally:
        torch.set_num_threads(prev)


def _fit_jointly(x: Float[torch.Tensor, "L n d"], folds: Sequence[Fold],
                 plans: list[list[TaskFold]], C: float, max_iter: int) -> list[list[dict]]:
    L, m, d = x.shape
    # One problem group per (fold, task): its train rows define the z-scoring statistics.
    groups = [(f, t) for f in range(len(folds)) for t in range(len(plans[f]))]
    G = len(groups)
    mask = torch.zeros(m, G)
    train_rows = {}
    for gi, (f, t) in enumerate(groups):
        train_rows[f, t] = torch.as_tensor(folds[f][0][plans[f][t].train])
        mask[train_rows[f, t], gi] = 1.0
    cnt = mask.sum(0).clamp_min(1)  # [G]
    center = x.mean(1, keepdim=True)  # [L, 1, d]: for a numerically stable variance
    s1 = torch.zeros(L, G, d)
    s2 = torch.zeros(L, G, d)
    for r in range(0, m, 2048):
        xc = x[:, r:r + 2048] - center
        mk = mask[r:r + 2048].T.expand(L, G, -1)
        s1 += torch.bmm(mk, xc)
        s2 += torch.bmm(mk, xc * xc)
    mean_c = s1 / cnt[None, :, None]
    var = (s2 / cnt[None, :, None] - mean_c ** 2).clamp_min(0)
    sd = var.sqrt()
    sd = torch.where(sd > 1e-6 * (1 + center.abs()), sd, torch.ones_like(sd))  # constant dims
    mu = mean_c + center  # [L, G, d]

    # Problems: (fold, task, variant), each with its own columns (binary: one logit, like
    # scikit-learn). All log-softmaxes run as one op over a padded [L, m, P, k_max] view of the
    # logits: extra columns ZERO (the fixed logit of a binary task) and PAD (-inf-like).
    spec = [(gi, v) for gi, (f, t) in enumerate(groups) for v in plans[f][t].y_train]
    ks = [plans[groups[gi][0]][groups[gi][1]].k for gi, _ in spec]
    P, kmax = len(spec), max(ks)
    ctot = sum(k if k > 2 else 1 for k in ks)
    ZERO, PAD = ctot, ctot + 1
    gather_idx = torch.full((P, kmax), PAD, dtype=torch.long)
    target = torch.zeros(m, P, dtype=torch.long)
    weight = torch.zeros(m, P)
    col_group, col_prob = [], []
    col = 0
    for p, (gi, v) in enumerate(spec):
        f, t = groups[gi]
        tf = plans[f][t]
        tgt = tf.y_train[v]
        ncol = tf.k if tf.k > 2 else 1
        cols = list(range(col, col + ncol))
        gather_idx[p, :tf.k] = torch.as_tensor(cols if tf.k > 2 else [ZERO] + cols)
        rows_t = train_rows[f, t]
        target[rows_t, p] = torch.as_tensor(tgt)
        bc = np.bincount(tgt, minlength=tf.k).astype(np.float64)
        cw = len(tgt) / (tf.k * np.maximum(bc, 1))  # class_weight="balanced"
        weight[rows_t, p] = torch.as_tensor(cw[tgt], dtype=torch.float32)
        col_group += [gi] * ncol
        col_prob += [p] * ncol
        col += ncol
    wsum = weight.sum(0).clamp_min(1e-12)  # [P]
    weight = weight / wsum  # each problem's loss is its weighted mean NLL, like sklearn's
    l2 = (1.0 / (2 * C * wsum))[torch.as_tensor(col_prob)]  # [ctot]
    ct = torch.as_tensor(col_group)
    sd_cols = sd[:, ct, :].transpose(1, 2).contiguous()  # [L, d, ctot]
    musd_cols = (mu[:, ct, :] / sd[:, ct, :]).transpose(1, 2).contiguous()

    W = torch.zeros(L, d, ctot, requires_grad=True)
    b = torch.zeros(L, ctot, requires_grad=True)

    def log_probs(x, Wv, bv):
        V = Wv / sd_cols
        off = bv - (musd_cols * Wv).sum(1)
        z = torch.baddbmm(off[:, None, :], x, V)  # [L, rows, ctot]
        extra = z.new_tensor([0.0, -1e9]).expand(*z.shape[:2], 2)
        z = torch.cat([z, extra], -1)[..., gather_idx]  # [L, rows, P, kmax]
        return torch.log_softmax(z, -1)

    def closure():
        opt.zero_grad()
        lp = log_probs(x, W, b)
        nll = -lp.gather(-1, target.expand(L, m, P)[..., None]).squeeze(-1)  # [L, m, P]
        total = (nll * weight).sum() + ((W ** 2).sum(1) * l2).sum()
        total.backward()
        return total

    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")
    opt.step(closure)

    out: list[list[dict]] = [[dict() for _ in plan] for plan in plans]
    with torch.no_grad():
        probs = log_probs(x, W, b).exp()  # [L, m, P, kmax]
        for p, (gi, v) in enumerate(spec):
            f, t = groups[gi]
            te = torch.as_tensor(folds[f][1][plans[f][t].test])
            out[f][t][v] = probs[:, te, p, :ks[p]].numpy()
    return out


def fit_predict_sklearn(xtr: Float[torch.Tensor, "L n_train d"],
                        xte: Float[torch.Tensor, "L n_test d"], plan: list[TaskFold], C: float,
                        max_iter: int) -> list[dict]:
    """Reference: StandardScaler + LogisticRegression(class_weight="balanced") per probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    L = xtr.shape[0]
    out: list[dict] = [dict() for _ in plan]
    for t, tf in enumerate(plan):
        for v, tgt in tf.y_train.items():
            res = np.zeros((L, len(tf.test), tf.k))
            for li in range(L):
                a = xtr[li][torch.as_tensor(tf.train)].numpy()
                clf = make_pipeline(StandardScaler(), LogisticRegression(
                    C=C, class_weight="balanced", max_iter=max_iter))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning on separable data
                    clf.fit(a, tgt)
                p = clf.predict_proba(xte[li][torch.as_tensor(tf.test)].numpy())
                res[li][:, clf.classes_] = p  # a class absent from training gets 0
            out[t][v] = res
    return out
