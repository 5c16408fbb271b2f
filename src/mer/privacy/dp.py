"""Differential privacy: DP-SGD at each client (Opacus, inside Lightning) and central DP.

**DP-SGD at a client** (Abadi et al., 2016) protects each *training sample* of that client's
data: every step draws a Poisson batch (each sample in with probability q), clips each
per-sample gradient to L2 norm ``max_grad_norm`` (C), adds Gaussian noise of std
``noise_multiplier * C`` to their sum and divides by the expected batch size ``q * n``.
Opacus does all of it: per-sample gradients by hooks (``GradSampleHooks``), clipping and
noise (``DPOptimizer``), Poisson batches (``DPDataLoader``) and the accountant (RDP or PRV).
Each client keeps one accountant (:class:`ClientPrivacy`) for the whole federation, so its
epsilon grows with the rounds: ``epsilon(delta)`` after round r counts all its steps so far.
Note: one micro-expression clip is one sample; a subject with several clips is protected
only as a group (group privacy: roughly k * epsilon for k clips).

Use in a Lightning fit (what the federated loop does per client and round)::

    fix_module(module)                      # at build time, for *every* copy of the model
    module, dm = make_private(module, datamodule, dp, privacy, seed)
    trainer.fit(module, datamodule=dm)
    privacy.epsilon()                       # cumulative (epsilon, at dp.delta)

Models: batch norm mixes samples in a batch, so per-sample gradients do not exist;
:func:`fix_module` converts it with ``opacus.validators.ModuleValidator.fix`` (BatchNorm ->
GroupNorm; this changes the state-dict layout, so the server's model must be fixed alike)
and turns in-place activations off (Opacus' backward hooks cannot see through them);
:func:`model_changes` lists what it changes (the federated run logs it and writes it in its
results). Per-sample gradients come one of two ways (``privacy.grad_sample``,
:func:`resolve_grad_sample`), each fed the batch exactly as normal training feeds it (the
flow, the named inputs, AU targets and landmarks); Opacus' DPOptimizer then clips, adds noise
and accounts:

- ``hooks``: Opacus' per-layer hooks, when every module holding parameters is a layer Opacus
  has a grad sampler for (conv 1/2/3-d, linear, group/layer norm...: STSTNet, dense_attention,
  MPFNet). Opacus' own fallback for other modules replays them with their *first* input only
  (MFDAN's blocks take three) and refuses modules with buffers (DPK-GAT), so those go to
  ``functorch``. A step checks that each layer saw one row per sample (a layer that folds
  other axes into the batch, as DPK-GAT's patch CNN does, would be clipped per row).
  Parameters a step does not reach (MPFNet's encoder frozen in its training stage) sit the
  step out: no noise, no update, as without DP.
- ``functorch``: the gradient of the module's own loss (``compute_loss``) on each sample as
  a batch of one (:func:`per_sample_gradients`): ``torch.func.vmap`` of ``torch.func.grad``
  (per-sample dropout) where the network allows it (MFDAN), else one backward pass per
  sample (DPK-GAT: its AU loss selects the annotated samples with a boolean mask, a
  data-dependent shape vmap cannot batch). Every trainable parameter gets a per-sample
  gradient (zero where unused: a staged network's idle part would get noise, so MPFNet
  runs under hooks).

**DP-SGD on in-memory tensors** (:func:`dp_sgd`): the same Opacus pieces (Poisson batches,
per-sample clipping, noise, one accountant per data holder) without Lightning, for a small
head over frozen features (``mer.models.frozen_head``, ``+experiment=dp_curve``), where a
step costs milliseconds. :func:`calibrate_noise` finds the sigma that spends a target epsilon
for DP-SGD and central DP alike.

FedProx under DP-SGD: the proximal term ``mu/2 ||w - w_global||^2`` involves no data, so its
gradient is added *after* clipping and noise (post-processing: no privacy cost).

**Central DP** (DP-FedAvg, McMahan et al., 2018) protects each *client*: the server clips
each client's update ``w_k - w_global`` to L2 norm C, averages the K updates (unweighted:
the sensitivity is then C / K) and adds Gaussian noise of std ``noise_multiplier * C / K``.
Its epsilon comes from Opacus' RDP accountant with one step per round at sampling rate
``K / (number of clients)``. (The loop samples a fixed number of clients without
replacement; the Poisson-sampling bound is exact when every client takes part, q = 1.)
What it protects: the *released* models (and what anyone learns from them about one
client's participation), not the updates. In mer's loop (``privacy=central_dp``) the server
clips each client's plaintext update itself, so it sees every individual update; it does not
run over secure aggregation (:meth:`CentralDP.add_noise` on a securely summed mean of
lab-clipped updates is the building block for that, not wired into the loop).
"""

from __future__ import annotations

import logging
import types
import warnings
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleHooks
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import TensorDataset

from mer.engine.module import MERModule
from mer.privacy.base import Layout, Weights, flatten, unflatten
from mer.privacy.checks import GRAD_SAMPLE_MODES

log = logging.getLogger(__name__)


class DPUnsupportedModel(ValueError):
    """The network cannot be trained with per-sample gradients by Opacus."""


@dataclass
class DPConfig:
    """DP-SGD parameters (``conf/privacy/dp.yaml``).

    Attributes:
        noise_multiplier: sigma; noise std = sigma * max_grad_norm. Ignored when
            ``target_epsilon`` is set (see :func:`noise_for_budget`).
        max_grad_norm: per-sample clipping norm C.
        target_epsilon: the budget over all planned steps (optional).
        delta: the delta of (epsilon, delta); below 1 / n.
        accountant: ``rdp`` or ``prv`` (Opacus accountants).
        sample_rate: Poisson sampling rate q; None: ``1 / round(n_train / batch_size)``
            (so that an epoch is a whole number of steps and Opacus, which accounts
            ``1 / steps per epoch``, accounts exactly the rate used).
        secure_mode: Opacus' cryptographically secure noise (needs torchcsprng).
        grad_sample: how per-sample gradients are computed: ``auto`` (Opacus' hooks where
            they are exact, else ``functorch``), ``hooks`` or ``functorch`` (module doc).
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    sample_rate: float | None = None
    secure_mode: bool = False
    grad_sample: str = "auto"


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The noise multiplier sigma that spends ``target_epsilon`` at ``delta`` in ``steps``
    steps of the subsampled Gaussian mechanism at Poisson rate ``sample_rate`` (Opacus'
    ``get_noise_multiplier``): the epsilon it gives is in ``(target - tolerance, target]``.

    The same calibration serves DP-SGD (q = expected batch / n, one step per batch) and
    central DP (q = sampled clients / clients, one step per round).

    Raises:
        ValueError: a target, delta, rate or step count out of range (named).
    """
    checks = {"target_epsilon": target_epsilon > 0, "delta": 0 < delta < 1,
              "sample_rate": 0 < sample_rate <= 1, "steps": int(steps) >= 1,
              "tolerance": 0 < tolerance < target_epsilon}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(
            f"noise calibration: {bad[0]} out of range (target_epsilon={target_epsilon}, "
            f"delta={delta}, sample_rate={sample_rate}, steps={steps}, tolerance="
            f"{tolerance}); need epsilon > 0, 0 < delta < 1, 0 < q <= 1, steps >= 1")
    return float(get_noise_multiplier(target_epsilon=float(target_epsilon),
                                      target_delta=float(delta), sample_rate=float(sample_rate),
                                      steps=int(steps), accountant=accountant,
                                      epsilon_tolerance=float(tolerance)))


def noise_for_budget(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``dp.target_epsilon`` (at ``dp.delta``) in ``steps``
    steps of Poisson rate ``sample_rate`` (:func:`calibrate_noise`); without a target,
    ``dp.noise_multiplier``."""
    if dp.target_epsilon is None:
        return float(dp.noise_multiplier)
    return calibrate_noise(dp.target_epsilon, dp.delta, sample_rate, steps, dp.accountant)


class ClientPrivacy:
    """One client's DP-SGD accountant, kept across rounds (history of (sigma, q, steps))."""

    def __init__(self, client_id: str, dp: DPConfig, noise_multiplier: float | None = None):
        self.client_id, self.dp = client_id, dp
        self.noise_multiplier = float(noise_multiplier if noise_multiplier is not None
                                      else dp.noise_multiplier)
        self.accountant = create_accountant(mechanism=dp.accountant)

    @property
    def steps(self) -> int:
        return int(sum(s for _, _, s in self.accountant.history))

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``dp.delta``); 0 before any step."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=delta if delta is not None
                                                 else self.dp.delta))


def model_changes(net: nn.Module) -> dict[str, int]:
    """What :func:`fix_module` changes in ``net``, counted by kind: ``{"BatchNorm2d ->
    GroupNorm": 6, "inplace off (ReLU)": 4}`` (empty: nothing)."""
    changes: dict[str, int] = {}
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            key = f"{type(m).__name__} -> GroupNorm"
        elif getattr(m, "inplace", False):
            key = f"inplace off ({type(m).__name__})"
        else:
            continue
        changes[key] = changes.get(key, 0) + 1
    return changes


def fix_module(module: MERModule) -> MERModule:
    """Make ``module.net`` trainable by Opacus, in place: BatchNorm -> GroupNorm
    (``ModuleValidator.fix``), in-place activations off (:func:`model_changes` lists them).
    Returns the module."""
    changes = model_changes(module.net)
    module.net = ModuleValidator.fix(module.net)
    for m in module.net.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    if changes:
        log.debug("DP: %s changed for Opacus: %s", type(module.net).__name__, changes)
    return module


def _check_supported(net: torch.nn.Module) -> None:
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise DPUnsupportedModel(
            f"{type(net).__name__} cannot be trained with DP-SGD as it is: "
            f"{'; '.join(str(e).splitlines()[0] for e in errors[:3])}. Build every copy of "
            "the model (server and clients) through mer.privacy.dp.fix_module(module), which "
            "converts batch norm to group norm")
    inplace = [n for n, m in net.named_modules() if getattr(m, "inplace", False)]
    if inplace:
        raise DPUnsupportedModel(f"{type(net).__name__}: in-place modules {inplace[:3]} break "
                                 "Opacus' hooks; use mer.privacy.dp.fix_module(module)")


def sample_rate_for(dp: DPConfig, n_train: int, batch_size: int) -> float:
    """Poisson rate q: ``dp.sample_rate`` or ``1 / round(n_train / batch_size)``."""
    if dp.sample_rate:
        return float(dp.sample_rate)
    return 1.0 / max(1, round(n_train / batch_size))


class DPDataModule(L.LightningDataModule):
    """A :class:`~mer.data.datamodule.SplitDataModule` whose training batches are Poisson
    samples (Opacus' ``DPDataLoader``): each step includes each training sample with
    probability ``sample_rate``; an epoch is ``round(1 / sample_rate)`` steps. Other loaders
    are the wrapped module's."""

    def __init__(self, datamodule, sample_rate: float, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"DP sample_rate must be in (0, 1], got {sample_rate}")
        self.inner, self.sample_rate, self.seed = datamodule, float(sample_rate), seed
        idx = torch.as_tensor(datamodule.train_idx, dtype=torch.long)
        self.train_set = TensorDataset(*(t[idx] for t in datamodule.tensors))

    def train_dataloader(self) -> DPDataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DPDataLoader(self.train_set, sample_rate=self.sample_rate, generator=gen)

    def val_dataloader(self):
        return self.inner.val_dataloader()

    def test_dataloader(self):
        return self.inner.test_dataloader()

    def predict_dataloader(self):
        return self.inner.predict_dataloader()


def hooks_gaps(net: nn.Module) -> list[str]:
    """The modules of ``net`` Opacus' hooks cannot give exact per-sample gradients of:
    those holding trainable parameters themselves that are not a layer type with an Opacus
    grad sampler, or that hold buffers (``name (Type)``; empty: hooks are exact)."""
    gaps: list[str] = []

    def walk(name: str, m: nn.Module) -> None:
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            if type(m) not in GradSampleHooks.GRAD_SAMPLERS or next(m.buffers(), None) is not None:
                gaps.append(f"{name or '<root>'} ({type(m).__name__})")
                return  # Opacus would take this module (and all below it) as one
        for child_name, child in m.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", net)
    return gaps


def hooks_supported(net: nn.Module) -> bool:
    """Whether Opacus' per-layer hooks give exact per-sample gradients of ``net``
    (:func:`hooks_gaps` is empty; MFDAN's blocks and DPK-GAT: no)."""
    return not hooks_gaps(net)


def resolve_grad_sample(net: nn.Module, wanted: str = "auto") -> str:
    """``hooks`` or ``functorch`` for ``net`` under ``privacy.grad_sample=wanted``.

    Raises:
        DPUnsupportedModel: ``hooks`` asked for a network they cannot take (named).
        ValueError: an unknown mode.
    """
    if wanted not in GRAD_SAMPLE_MODES:
        raise ValueError(f"privacy.grad_sample={wanted!r}: use one of {list(GRAD_SAMPLE_MODES)}")
    if wanted == "auto":
        return "hooks" if hooks_supported(net) else "functorch"
    if wanted == "hooks" and not hooks_supported(net):
        raise DPUnsupportedModel(
            f"privacy.grad_sample=hooks: Opacus' hooks cannot give {type(net).__name__}'s "
            f"per-sample gradients: {hooks_gaps(net)[:3]} hold parameters but are no layer "
            "Opacus has a grad sampler for (or hold buffers). Use privacy.grad_sample=auto or "
            "functorch")
    return wanted


def make_private(module: MERModule, datamodule, dp: DPConfig, privacy: ClientPrivacy,
                 seed: int = 0) -> tuple[MERModule, DPDataModule]:
    """Make a module's next ``Trainer.fit`` DP-SGD; returns ``(module, dp_datamodule)``.

    In place: ``configure_optimizers`` wraps the module's optimiser in Opacus' DPOptimizer
    (clip to ``dp.max_grad_norm``, noise ``privacy.noise_multiplier``) with ``privacy``'s
    accountant. Per-sample gradients (:func:`resolve_grad_sample`, ``dp.grad_sample``) come
    from Opacus' hooks on ``module.net`` (no wrapper: the state dict keeps its keys; removed
    at the end of the fit) or from ``torch.func`` on the module's loss of each sample alone
    (manual optimisation). Fit with the returned datamodule (Poisson batches at
    :func:`sample_rate_for`).

    Raises:
        DPUnsupportedModel: the network has batch norm / in-place modules (run
            :func:`fix_module` first), or ``dp.grad_sample=hooks`` for a network they
            cannot take.
    """
    _check_supported(module.net)
    mode = resolve_grad_sample(module.net, dp.grad_sample)
    q = sample_rate_for(dp, len(datamodule.train_idx), datamodule.batch_size)
    dm = DPDataModule(datamodule, q, seed)
    if mode == "functorch":
        return _make_private_functorch(module, dm, dp, privacy, seed), dm
    base_configure = module.configure_optimizers
    base_training_step = module.training_step

    def configure_optimizers(self):
        optimizer = base_configure()
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
        engine.accountant = privacy.accountant  # the client's history carries on
        noise_gen = None if dp.secure_mode else torch.Generator().manual_seed(seed + 1)
        hooks, dp_opt, _ = engine.make_private(
            module=self.net, optimizer=optimizer, data_loader=dm.train_dataloader(),
            noise_multiplier=privacy.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=False, wrap_model=False, noise_generator=noise_gen)
        self._dp_hooks = hooks
        _guard_hook_steps(dp_opt, self)
        if self.loss_terms:
            _add_loss_terms_after_noise(dp_opt, self)
        return dp_opt

    def training_step(self, batch, batch_idx):
        self._dp_rows = len(batch[1])
        if len(batch[1]) == 0:  # an empty Poisson batch: the step is noise only
            out = self(batch[0], *self._inputs(batch))
            return getattr(out, "logits", out).sum() * 0.0
        return base_training_step(batch, batch_idx)

    def on_fit_end(self):
        hooks = getattr(self, "_dp_hooks", None)
        if hooks is not None:
            hooks.cleanup()  # removes the hooks and Opacus' attributes on the parameters
            self._dp_hooks = None

    module.configure_optimizers = types.MethodType(configure_optimizers, module)
    module.training_step = types.MethodType(training_step, module)
    module.on_fit_end = types.MethodType(on_fit_end, module)
    return module, dm


def _guard_hook_steps(dp_opt, module: MERModule) -> None:
    """Wrap ``dp_opt.pre_step`` (clip, noise, account) for Opacus' hooks: a parameter the
    step's forward did not reach (no ``grad_sample``: MPFNet's encoder frozen in this stage)
    sits the step out, as it would without DP (which parameters a step uses depends on the
    step count only, not on the data); a reached one must have one per-sample row per sample
    of the batch, else its layer batches over something else and clipping would not be
    per sample."""
    base_pre_step = dp_opt.pre_step
    names = {id(p): n for n, p in module.net.named_parameters()}

    def pre_step(closure=None):
        rows, idle = getattr(module, "_dp_rows", None), []
        for p in dp_opt.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                idle.append(p)
                continue
            n = len(gs) if isinstance(gs, torch.Tensor) else sum(len(g) for g in gs)
            if rows is not None and n != rows:
                raise DPUnsupportedModel(
                    f"{type(module.net).__name__}: Opacus' hooks gave "
                    f"{names.get(id(p), '?')} {n} per-sample gradients for a batch of {rows}: "
                    "its layer batches over more than the samples, so clipping would not be "
                    "per sample. Use privacy.grad_sample=functorch")
        if len(idle) == len(dp_opt.params):
            return base_pre_step(closure)
        for p in idle:
            p.requires_grad_(False)  # out of DPOptimizer.params for this step
        try:
            return base_pre_step(closure)
        finally:
            for p in idle:
                p.requires_grad_(True)

    dp_opt.pre_step = pre_step


class _OneSampleLoss(nn.Module):
    """``forward(*batch)``: the module's training loss (``compute_loss``) on ``batch``."""

    def __init__(self, module: MERModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.module.compute_loss(batch)[0]


def _tensor_attributes(net: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor | None]]:
    """Plain tensor attributes of ``net``'s modules (not parameters or buffers), e.g. MFDAN's
    ``last_attention``; None-valued ones too (a forward may fill them)."""
    return [(m, k, v) for m in net.modules() for k, v in vars(m).items()
            if not k.startswith("_") and (v is None or isinstance(v, torch.Tensor))]


def _restore_tensor_attributes(kept: list[tuple[nn.Module, str, torch.Tensor | None]]) -> None:
    # what a forward stores on a module inside vmap is a functorch wrapper that must not
    # outlive it (it cannot even be copied): put the attributes back as they were
    for m, k, v in kept:
        setattr(m, k, v)


# (module class, net class) pairs whose loss torch.func.vmap could not batch: not retried
_NOT_VECTORISABLE: set[tuple[str, str]] = set()


def per_sample_gradients(module: MERModule, batch: tuple[torch.Tensor, ...], names: list[str]
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients of the module's loss: ``(grads, losses)``.

    For each sample i of ``batch`` (x, y, then whatever the batch carries, as the datamodule
    gives it), the gradient of ``module.compute_loss`` on the batch of that one sample with
    respect to the net's parameters ``names``: grads[k] (B, *shape of names[k]), zero where a
    parameter is unused; losses (B,). ``torch.func.vmap`` of ``torch.func.grad`` over the
    samples (each draws its own dropout) where the network allows it; else (e.g. a loss that
    selects samples with a boolean mask, a data-dependent shape vmap cannot batch) one
    backward pass per sample.
    """
    own = dict(module.net.named_parameters())
    n = len(batch[1])
    if n == 0:
        return [own[k].new_zeros((0, *own[k].shape)) for k in names], torch.zeros(0)
    kind = (type(module).__qualname__, type(module.net).__qualname__)
    if kind not in _NOT_VECTORISABLE:
        wrapper = _OneSampleLoss(module)

        def loss_one(p, *sample):
            loss = torch.func.functional_call(wrapper, p, tuple(t.unsqueeze(0) for t in sample))
            return loss, loss.detach()

        params = {f"module.net.{k}": own[k].detach() for k in names}
        kept = _tensor_attributes(module.net)
        try:
            grads, losses = torch.func.vmap(
                torch.func.grad(loss_one, has_aux=True), in_dims=(None,) + (0,) * len(batch),
                randomness="different")(params, *batch)
            return [grads[f"module.net.{k}"] for k in names], losses
        except RuntimeError as e:
            _NOT_VECTORISABLE.add(kind)
            log.info("DP: %s's loss cannot be vectorised by torch.func.vmap (%s); per-sample "
                     "gradients by one backward pass per sample", kind[1],
                     str(e).splitlines()[0])
        finally:
            _restore_tensor_attributes(kept)
    tensors = [own[k] for k in names]
    per_sample: list[list[torch.Tensor]] = [[] for _ in names]
    losses = []
    for i in range(n):
        loss, _ = module.compute_loss(tuple(t[i:i + 1] for t in batch))
        for k, (p, g) in enumerate(zip(tensors, torch.autograd.grad(loss, tensors,
                                                                     allow_unused=True))):
            per_sample[k].append(torch.zeros_like(p) if g is None else g)
        losses.append(loss.detach())
    return [torch.stack(g) for g in per_sample], torch.stack(losses)


def _make_private_functorch(module: MERModule, dm: DPDataModule, dp: DPConfig,
                            privacy: ClientPrivacy, seed: int) -> MERModule:
    """DP-SGD with per-sample gradients from :func:`per_sample_gradients` (manual
    optimisation): each step sets ``p.grad_sample`` (B, *p.shape), then Opacus' DPOptimizer
    clips, sums, adds noise, divides by the expected batch size and steps the client's
    accountant, exactly as with hooks."""
    from opacus.optimizers import DPOptimizer

    base_configure = module.configure_optimizers
    expected = max(1, round(dm.sample_rate * len(dm.train_set)))
    module.automatic_optimization = False

    def configure_optimizers(self):
        noise_gen = None if dp.secure_mode else torch.Generator().manual_seed(seed + 1)
        dp_opt = DPOptimizer(base_configure(), noise_multiplier=privacy.noise_multiplier,
                             max_grad_norm=dp.max_grad_norm, expected_batch_size=expected,
                             generator=noise_gen, secure_mode=dp.secure_mode)
        dp_opt.attach_step_hook(privacy.accountant.get_optimizer_hook_fn(dm.sample_rate))
        if self.loss_terms:
            _add_loss_terms_after_noise(dp_opt, self)
        return dp_opt

    def training_step(self, batch, batch_idx):
        named = [(k, p) for k, p in self.net.named_parameters() if p.requires_grad]
        grads, losses = per_sample_gradients(self, tuple(batch), [k for k, _ in named])
        for (_, p), g in zip(named, grads):
            p.grad_sample = g
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        n = len(batch[1])
        self.log("train_loss", losses.sum() / max(n, 1), on_step=False, on_epoch=True,
                 batch_size=max(n, 1))

    module.configure_optimizers = types.MethodType(configure_optimizers, module)
    module.training_step = types.MethodType(training_step, module)
    return module


def _add_loss_terms_after_noise(dp_opt, module: MERModule) -> None:
    """Chain onto Opacus' step hook (run after clip + noise): add the gradient of the module's
    extra loss terms (``module.loss_terms``, e.g. FedProx's ``mu/2 ||w - anchor||^2``, whose
    gradient is ``mu (w - anchor)``): they hold no sample, so they are neither clipped nor
    noised."""
    accountant_hook = dp_opt.step_hook

    def hook(opt) -> None:
        if accountant_hook is not None:
            accountant_hook(opt)
        params = [p for p in module.net.parameters() if p.requires_grad]
        with torch.enable_grad():
            extra = module.extra_loss()
            grads = torch.autograd.grad(extra, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if p.grad is not None and g is not None:
                    p.grad.add_(g)

    dp_opt.step_hook = hook


# --------------------------------------------------------------------------------------------
# sample-level DP-SGD on in-memory tensors (a small head over frozen features)
# --------------------------------------------------------------------------------------------


def dp_sgd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, privacy: ClientPrivacy, *,
           steps: int, sample_rate: float, max_grad_norm: float, lr: float,
           momentum: float = 0.0, seed: int = 0) -> dict:
    """``steps`` steps of sample-level DP-SGD on ``net``'s trainable parameters, in place.

    Each step draws a Poisson batch of (x (N, ...), y (N,)) (Opacus' ``DPDataLoader``: each
    sample in with probability q = ``sample_rate``, so the batch size varies and may be 0),
    takes per-sample cross-entropy gradients (Opacus' hooks), clips each to L2 norm C =
    ``max_grad_norm``, adds N(0, (sigma C)^2) with sigma = ``privacy.noise_multiplier``,
    divides by the expected batch q N and takes an SGD step. ``privacy``'s accountant records
    every step at rate q, so ``privacy.epsilon()`` counts all of them (it carries on across
    calls: one accountant per data holder). Frozen parameters (``requires_grad=False``) and
    anything outside ``net.parameters()`` get no gradient and no noise.

    Returns ``{"steps", "sample_rate", "noise_multiplier", "batch_sizes", "mean_batch",
    "signal_norm", "noise_norm"}``: the Poisson batch sizes, and the mean over steps of the
    norm of the summed clipped gradients (signal, <= batch * C) and of the added noise
    (about sigma C sqrt(D)).

    Raises:
        ValueError: empty or mismatched data, a rate outside (0, 1], steps < 1, C <= 0, or a
            network without trainable parameters.
    """
    from opacus.optimizers import DPOptimizer

    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"dp_sgd: x has {n} samples and y {len(y)}; need the same, > 0")
    if not 0.0 < sample_rate <= 1.0 or int(steps) < 1 or max_grad_norm <= 0:
        raise ValueError(f"dp_sgd: sample_rate={sample_rate} (need 0 < q <= 1), steps={steps} "
                         f"(need >= 1), max_grad_norm={max_grad_norm} (need > 0)")
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"dp_sgd: {type(net).__name__} has no trainable parameter")
    gen = torch.Generator().manual_seed(int(seed))
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=float(sample_rate), generator=gen)
    hooks = GradSampleHooks(net, loss_reduction="sum")
    expected = float(sample_rate) * n
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=lr, momentum=momentum),
        noise_multiplier=privacy.noise_multiplier, max_grad_norm=float(max_grad_norm),
        expected_batch_size=expected, loss_reduction="mean",
        generator=torch.Generator().manual_seed(int(seed) + 1))
    optimizer.attach_step_hook(privacy.accountant.get_optimizer_hook_fn(float(sample_rate)))
    batches, signal, noise, done = [], [], [], 0
    was_training = net.training
    net.train()
    try:
        with warnings.catch_warnings():  # the head's input needs no gradient: nothing to do
            warnings.filterwarnings("ignore", message=r".*Full backward hook is firing.*")
            while done < int(steps):
                for xb, yb in loader:
                    optimizer.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(xb), yb, reduction="sum").backward()
                    optimizer.step()
                    summed = torch.cat([p.summed_grad.reshape(-1) for p in params])
                    noisy = torch.cat([p.grad.reshape(-1) for p in params]) * expected
                    batches.append(len(yb))
                    signal.append(float(summed.norm()))
                    noise.append(float((noisy - summed).norm()))
                    done += 1
                    if done == int(steps):
                        break
    finally:
        optimizer.zero_grad(set_to_none=True)
        hooks.cleanup()
        net.train(was_training)
    return {"steps": done, "sample_rate": float(sample_rate),
            "noise_multiplier": privacy.noise_multiplier, "batch_sizes": batches,
            "mean_batch": float(np.mean(batches)), "signal_norm": float(np.mean(signal)),
            "noise_norm": float(np.mean(noise))}


# --------------------------------------------------------------------------------------------
# central DP at the server
# --------------------------------------------------------------------------------------------


@dataclass
class CentralDPConfig:
    """Central DP parameters (``conf/privacy/central_dp.yaml``).

    Attributes:
        noise_multiplier: sigma; noise std on the mean update = sigma * clip_norm / K.
        clip_norm: C, the bound on each client's update norm (all state-dict entries).
        delta: the delta of (epsilon, delta); below 1 / (number of clients).
        accountant: ``rdp`` (Opacus).
        min_clients: the fewest clipped updates averaged; a round with fewer is skipped.
    """

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-3
    accountant: str = "rdp"
    min_clients: int = 3


def clip_update(weights: Weights, reference: Weights, clip_norm: float) -> tuple[Weights, float]:
    """``reference + clip(w - reference)``: the update scaled to L2 norm <= C over all
    entries. Returns the clipped model and the update's norm before clipping."""
    layout = Layout.of(reference)
    ref = flatten(reference)
    delta = flatten(weights) - ref
    norm = float(np.linalg.norm(delta))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return unflatten(ref + delta * scale, layout), norm


class CentralDP:
    """DP-FedAvg at the server: clip each update to C, unweighted mean, Gaussian noise.

    ``aggregate`` does all three on plaintext updates; under secure aggregation the clients
    clip (:func:`clip_update`) and send ``n = 1`` so the secure mean is the unweighted one,
    and the server calls :meth:`add_noise` on it.
    """

    def __init__(self, cfg: CentralDPConfig, num_clients: int, seed: int = 0) -> None:
        if num_clients <= 0:
            raise ValueError("CentralDP: num_clients must be > 0")
        self.cfg, self.num_clients = cfg, int(num_clients)
        self.accountant = create_accountant(mechanism=cfg.accountant)
        self.rng = np.random.default_rng(seed)

    def noise_std(self, num_sampled: int) -> float:
        """Std of the noise on the mean update: sigma * C / K."""
        return self.cfg.noise_multiplier * self.cfg.clip_norm / num_sampled

    def add_noise(self, global_weights: Weights, mean_weights: Weights,
                  num_sampled: int) -> Weights:
        """``global + (mean - global) + N(0, (sigma C / K)^2)`` per entry; one accountant step
        at rate ``K / num_clients``. ``mean_weights`` = unweighted mean of clipped models."""
        layout = Layout.of(global_weights)
        mean = flatten(mean_weights)
        noisy = mean + self.rng.normal(0.0, self.noise_std(num_sampled), size=mean.shape)
        self.accountant.step(noise_multiplier=self.cfg.noise_multiplier,
                             sample_rate=min(1.0, num_sampled / self.num_clients))
        return unflatten(noisy, layout)

    def aggregate(self, global_weights: Weights, results: list[tuple[Weights, int]]) -> Weights:
        """Clip every client's update to C, take the unweighted mean, add noise.

        Example counts are ignored (weighting would change the sensitivity)."""
        if not results:
            raise ValueError("CentralDP: no client results")
        clipped = [flatten(clip_update(w, global_weights, self.cfg.clip_norm)[0])
                   for w, _ in results]
        mean = unflatten(np.mean(clipped, axis=0), Layout.of(global_weights))
        return self.add_noise(global_weights, mean, len(results))

    def epsilon(self, delta: float | None = None) -> float:
        """Client-level epsilon spent so far (0 before the first round)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=delta if delta is not None
                                                 else self.cfg.delta))
