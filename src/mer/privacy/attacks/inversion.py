"""Gradient inversion by an honest-but-curious server (iDLG / "inverting gradients" style).

Setting (FedSGD, the attack's most favourable case): in a round a client takes one SGD step
of rate ``lr`` on one ME flow image x (3, 28, 28) with label y, and sends its new weights.
The server knows the global model, so it sees the update ``u = w_global - w_client =
lr * grad_w CE(net(x), y)``. It then:

1. Recovers the label (iDLG, Zhao et al. 2020): the classifier's bias gradient is
   ``softmax(z) - onehot(y)``, negative only at y: ``y_hat = argmin u_bias``. (iDLG's sign
   trick on the weight rows needs non-negative features; STSTNet's follow a norm layer.)
2. Matches the classifier's gradient: its weight gradient is ``(softmax(z) - onehot(y)) h^T``
   with h the classifier's input, so ``h = u_W[c] / u_b[c]`` for any class c (Phong et al.
   2017): the 400 pooled features of x, read off the update exactly.
3. Optimises a dummy image x' in [0, 1] (Adam, from a flat grey image) so that its classifier
   input matches h, with a total-variation prior: ``||h(x') - h||^2 / ||h||^2 + tv TV(x')``,
   plus, with ``grad_weight > 0``, Geiping et al.'s (2020) cosine matching of the remaining
   layers' gradients (double back-propagation). On STSTNet the cosine term pulls the
   image away from the truth (max-pool and ReLU make that landscape rough; measured in
   ``scripts/bench_privacy.py --attacks``), so it is off by default.

Protections compared (:func:`run_inversion`): ``none``; ``dp``: the client's step is DP-SGD
(Opacus ``GradSampleModule`` + ``DPOptimizer``: clip to C, noise sigma * C); ``secagg``: the
server gets only the sum of K >= 3 clients' updates (through
:class:`mer.privacy.secagg.MaskedAggregation`) and attacks it as if it were one client's.
The network is used in training mode (Opacus records activations only then) and should have
no dropout (STSTNet with ``dropout=0``): an unknown dropout mask would only hinder the
attacker. For ``dp`` it must be Opacus-compatible (STSTNet after
:func:`mer.privacy.dp.fix_module`: group norm); the same network is used in every setting.

Scores against the true flow: PSNR and SSIM (``kornia.metrics``, images in [0, 1], the
range of mer's normalised flow images) and label recovery. Baselines: a uniformly random
image (``random_psnr``) and, where other flows are given, their mean (``mean_psnr``: what
knowing only the typical flow gives).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from kornia.metrics import psnr, ssim
from torch import nn
from torch.nn import functional as F

from mer.privacy.attacks import one_thread


@dataclass
class InversionConfig:
    """Attack settings. steps: Adam steps (cosine-annealed rate from lr); tv: total-variation
    weight; grad_weight: weight of the cosine gradient match of the layers before the
    classifier (0: off)."""

    steps: int = 400
    lr: float = 0.05
    tv: float = 0.05
    grad_weight: float = 0.0


def last_linear(net: nn.Module) -> nn.Linear:
    """The network's last ``nn.Linear`` (the classifier), which must have a bias."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError(f"{type(net).__name__}: no final Linear layer with a bias to read "
                         "the label from")
    return linears[-1]


def client_update(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1,
                  noise_multiplier: float | None = None, max_grad_norm: float = 1.0,
                  seed: int = 0) -> list[torch.Tensor]:
    """One local SGD step on the batch (x (B, C, H, W), y (B,)); returns the update
    ``w_before - w_after`` per parameter (``net.parameters()`` order). With
    ``noise_multiplier`` the step is Opacus DP-SGD (per-sample clip to ``max_grad_norm``,
    Gaussian noise ``noise_multiplier * max_grad_norm``)."""
    local = copy.deepcopy(net).train()
    before = [p.detach().clone() for p in local.parameters()]
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    if noise_multiplier is None:
        F.cross_entropy(local(x), y).backward()
        opt.step()
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(local)
        dp_opt = DPOptimizer(opt, noise_multiplier=noise_multiplier,
                             max_grad_norm=max_grad_norm, expected_batch_size=len(x),
                             generator=torch.Generator().manual_seed(seed))
        F.cross_entropy(gsm(x), y).backward()
        dp_opt.step()
        gsm._close()
    return [b - p.detach() for b, p in zip(before, local.parameters())]


def infer_label(net: nn.Module, update: list[torch.Tensor]) -> int:
    """iDLG label: the class whose classifier-bias update is the most negative."""
    names = [id(p) for p in net.parameters()]
    bias = update[names.index(id(last_linear(net).bias))]
    return int(torch.argmin(bias))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, x (B, C, H, W) -> scalar."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + \
        (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def classifier_input(net: nn.Module, update: list[torch.Tensor]) -> torch.Tensor:
    """The classifier's input features h (F,) read off its update: ``u_W[c] / u_b[c]`` for
    the class c with the largest bias update (exact for a one-sample step)."""
    ids = [id(p) for p in net.parameters()]
    fc = last_linear(net)
    u_w, u_b = update[ids.index(id(fc.weight))], update[ids.index(id(fc.bias))]
    c = int(u_b.abs().argmax())
    return u_w[c] / u_b[c]


def invert(net: nn.Module, update: list[torch.Tensor], shape: tuple[int, ...], label: int,
           cfg: InversionConfig | None = None, seed: int = 0,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Reconstruct one input (1, *shape) from a one-sample update (see the module doc).

    ``init``: the image to start from (1, *shape), e.g. a typical flow the attacker knows
    from public data; default a flat grey image. Returns the reconstruction in [0, 1] and
    its final relative feature distance.
    """
    cfg = cfg or InversionConfig()
    net = copy.deepcopy(net).train()
    params = list(net.parameters())
    fc = last_linear(net)
    target_h = classifier_input(net, update).detach()
    others = [k for k, p in enumerate(params) if p is not fc.weight and p is not fc.bias]
    captured: dict[str, torch.Tensor] = {}  # the classifier's input (net is our own copy)
    fc.register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0]))
    y = torch.tensor([label])
    gen = torch.Generator().manual_seed(seed)
    start = init.clone() if init is not None else torch.full((1, *shape), 0.5)
    dummy = (start + 0.01 * torch.randn((1, *shape), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([dummy], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    with one_thread():
        for _ in range(cfg.steps):
            opt.zero_grad()
            logits = net(dummy)
            feat = ((captured["h"][0] - target_h) ** 2).sum() / (target_h ** 2).sum()
            loss = feat + cfg.tv * total_variation(dummy)
            if cfg.grad_weight:
                grads = torch.autograd.grad(F.cross_entropy(logits, y),
                                            [params[k] for k in others], create_graph=True)
                loss = loss + cfg.grad_weight * sum(
                    1.0 - F.cosine_similarity(g.flatten(), update[k].flatten(), dim=0)
                    for g, k in zip(grads, others)) / len(others)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                dummy.clamp_(0.0, 1.0)
    return dummy.detach(), float(feat)


def image_scores(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) of images in [0, 1], (1, C, H, W) each (kornia, SSIM window 7)."""
    est, ref = estimate.clamp(0, 1).float(), truth.clamp(0, 1).float()
    return (float(psnr(est, ref, max_val=1.0)),
            float(ssim(est, ref, window_size=7, max_val=1.0).mean()))


def run_inversion(net: nn.Module, x: torch.Tensor, y: torch.Tensor, protection: str = "none",
                  cfg: InversionConfig | None = None, lr: float = 0.1,
                  noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                  others: tuple[torch.Tensor, torch.Tensor] | None = None,
                  seed: int = 0, public: torch.Tensor | None = None) -> dict:
    """Attack the update of the client holding (x (1, C, H, W), y (1,)).

    Args:
        protection: ``none``, ``dp`` (a DP-SGD step with ``noise_multiplier``,
            ``max_grad_norm``) or ``secagg`` (the server sees only the masked sum of this
            client's update and those of K - 1 >= 2 clients holding one sample each of
            ``others``).
        others: (xs (M, C, H, W), ys (M,)) other clients' samples: the co-aggregated clients
            under ``secagg``, and the mean-flow baseline in every setting.
        public: (P, C, H, W) flows the attacker holds (public data, none of the clients'):
            their mean is the attacker's prior, the image the inversion starts from
            (``prior_psnr`` / ``prior_ssim``: what the prior alone scores).

    Returns:
        psnr, ssim (vs x), label_ok, the baselines random_psnr / random_ssim (a uniformly
        random image) and mean_psnr / mean_ssim (the mean of ``others``), feature_distance
        (final relative feature mismatch), and for ``secagg`` psnr_best_client (the best PSNR
        against any of the K clients' images: the attacker's most favourable reading).
    """
    if protection == "none":
        update = client_update(net, x, y, lr=lr)
    elif protection == "dp":
        update = client_update(net, x, y, lr=lr, noise_multiplier=noise_multiplier,
                               max_grad_norm=max_grad_norm, seed=seed)
    elif protection == "secagg":
        if others is None or len(others[0]) < 2:
            raise ValueError("secagg: give at least two other clients' samples (K >= 3)")
        update = secure_sum_of_updates(net, [(x, y)] + [
            (others[0][k:k + 1], others[1][k:k + 1]) for k in range(len(others[0]))], lr)
    else:
        raise ValueError(f"unknown protection {protection!r}: none, dp or secagg")
    label = infer_label(net, update)
    prior = public.mean(0, keepdim=True) if public is not None else None
    estimate, feature_distance = invert(net, update, tuple(x.shape[1:]), label, cfg, seed=seed,
                                        init=prior)
    p, s = image_scores(estimate, x)
    rp, rs = image_scores(torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)), x)
    out = {"protection": protection, "psnr": p, "ssim": s, "label_ok": label == int(y[0]),
           "random_psnr": rp, "random_ssim": rs, "feature_distance": feature_distance}
    if others is not None:
        out["mean_psnr"], out["mean_ssim"] = image_scores(others[0].mean(0, keepdim=True), x)
    if prior is not None:
        out["prior_psnr"], out["prior_ssim"] = image_scores(prior, x)
    if protection == "secagg":
        out["psnr_best_client"] = max([p] + [image_scores(estimate, others[0][k:k + 1])[0]
                                             for k in range(len(others[0]))])
    return out


def secure_sum_of_updates(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                          lr: float) -> list[torch.Tensor]:
    """What the server learns under secure aggregation: the sum of the K clients' updates,
    each masked by :class:`~mer.privacy.secagg.MaskedAggregation` and unmasked only in sum."""
    from mer.privacy.base import unflatten
    from mer.privacy.secagg import MaskedAggregation, MaskParams

    updates = [[u.numpy().astype(np.float64) for u in client_update(net, bx, by, lr=lr)]
               for bx, by in batches]
    ids = [f"client{k}" for k in range(len(batches))]
    agg = MaskedAggregation(MaskParams(frac_bits=40))
    agg.begin_round(0, ids, updates[0])
    payloads = {c: agg.client_payload(c, u, 1) for c, u in zip(ids, updates)}
    total, _ = agg.decode_sum(agg.server_sum(payloads), ids)
    return [torch.as_tensor(a, dtype=torch.float32) for a in unflatten(total, agg.layout)]


# --------------------------------------------------------------------------------------------
# ME-like flow images for tests and the report (no database needed)
# --------------------------------------------------------------------------------------------

_CLASS_AUS = {  # composite classes: negative, positive, surprise
    0: ((4,), (4, 7), (9,), (10,), (4, 9)),
    1: ((12,), (6, 12)),
    2: ((1, 2), (1, 2, 5), (5,)),
}


def synthetic_me_flows(n: int, seed: int = 0, size: int = 28, noise: float = 0.03
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """n ME-like flow images (n, 3, size, size) in [0, 1] and labels (n,) in {0, 1, 2}.

    Each is SynME's apex displacement (:func:`mer.data.synthetic.au_displacement`) of a
    jittered template face for AUs of its class, stacked with its optical strain and min-max
    normalised per channel as mer's flow pipeline does. ``noise``: std (px) of the white
    noise added to the displacement (flow estimation error; higher = a harder task).
    """
    from mer.data.landmarks import FACE_TEMPLATE_68
    from mer.data.preprocess.pipeline import minmax_normalise
    from mer.data.preprocess.strain import optical_strain
    from mer.data.synthetic import au_displacement

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(n):
        label = k % 3
        aus = _CLASS_AUS[label][int(rng.integers(len(_CLASS_AUS[label])))]
        lm = FACE_TEMPLATE_68.numpy() * rng.uniform(0.9, 1.05) * size
        lm = lm + rng.normal(0.0, 0.4, lm.shape) + rng.uniform(-1.0, 1.0, 2)
        flow = au_displacement(lm, {au: rng.uniform(0.6, 1.2) for au in aus}, size, size)
        flow = flow + rng.normal(0.0, noise, flow.shape).astype(np.float32)
        stack = np.concatenate([flow.transpose(2, 0, 1), optical_strain(flow)[None]])
        xs.append(minmax_normalise(stack))
        ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)
