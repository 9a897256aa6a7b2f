"""Regularization-based continual learners: ``ewc``, ``online_ewc``, ``si`` (penalties that hold the weights that
mattered to earlier tasks near their values) and ``lwf`` (distillation of the previous model's outputs).

Each trains one shared encoder with the scenario's heads, as ``finetune`` does. A penalty covers the parameters a
later task trains: the encoder's, and in the class and domain scenarios also the one head's (in the task scenario
each head is its own task's and is frozen after it). Everything consolidated after a task (Fisher diagonals,
importances, anchors, the previous model's weights) is the learner's ``state_dict``; what accumulates during a task
(SI's path integral) is its extension's, saved in ``last.pt``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.data.loaders import reshuffled
from mtl.engine.extension import StepExtension
from mtl.models.transfer import TransferModel
from mtl.workflows.learners import LEARNERS, ConcatHeads, SharedEncoderLearner

Params = Dict[str, Tensor]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(method: str, option: str, ok: bool, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"continual.options.{method}.{option} must be {rule}, got {value!r}")


def fisher_diagonal(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Iterable[Tuple[Tensor, Tensor]],
    logits: Callable[[Any], Tensor] = lambda out: out,
    empirical: bool = False,
) -> Params:
    """The diagonal of the Fisher information of the classifier ``p(y|x) = softmax(logits(model(x)))`` with respect to
    ``params`` (some of ``model``'s parameters, by any names), at their current values, in eval mode, averaged over
    the samples of ``batches`` ((inputs, labels) pairs), from per-sample gradients (``torch.func``):

        exact:      F_j = 1/N sum_n sum_y p(y|x_n) (d log p(y|x_n) / d theta_j)^2   (labels from the model: the Fisher)
        empirical:  F_j = 1/N sum_n (d log p(y_n|x_n) / d theta_j)^2                 (the data's labels y_n)
    """
    paths = {id(p): path for path, p in model.named_parameters()}
    names = {paths[id(p)]: name for name, p in params.items()}  # the model's own name -> the caller's
    theta = {path: params[name].detach() for path, name in names.items()}

    def log_likelihood(theta: Params, x: Tensor, y: Tensor) -> Tensor:
        log_probs = torch.log_softmax(logits(functional_call(model, theta, (x.unsqueeze(0),))), dim=-1)[0]
        return log_probs.gather(0, y.reshape(1))[0]

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(p, dtype=p.dtype) for name, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # grad() still differentiates inside it; the parameters outside theta record no graph
            for x, y in batches:
                if empirical:
                    weighted = [(torch.ones_like(y, dtype=x.dtype), y)]
                else:
                    probs = torch.softmax(logits(model(x)), dim=-1)
                    weighted = [(probs[:, c], torch.full_like(y, c)) for c in range(probs.shape[-1])]
                for weight, labels in weighted:
                    grads = per_sample(theta, x, labels)
                    for path, name in names.items():
                        total[name] += torch.tensordot(weight.to(grads[path].dtype), grads[path].pow(2), dims=1)
                count += y.shape[0]
    finally:
        model.train(was_training)
    return {name: t / max(count, 1) for name, t in total.items()}


def distillation_loss(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """LwF's distillation loss (Li & Hoiem, eqs. 2-3), averaged over the batch: ``-sum_i y'_i log yhat'_i`` with
    ``y'_i = y_i^(1/T) / sum_j y_j^(1/T)`` of the old model's probabilities y (and yhat' likewise of the new model's),
    which is ``softmax(logits / T)``."""

    def wide(t: Tensor) -> Tensor:
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    target = torch.softmax(wide(old_logits) / temperature, dim=1)
    return -(target * torch.log_softmax(wide(new_logits) / temperature, dim=1)).sum(dim=1).mean()


class QuadraticPenalty(StepExtension):
    """Adds ``scale * sum_t sum_j importance_t[j] (theta_j - anchor_t[j])^2`` to the loss: one term per pair of
    ``terms``, over the parameters each importance names (``params``: the live parameters by those names)."""

    def __init__(self, params: Mapping[str, Tensor], terms: List[Tuple[Params, Params]], scale: float) -> None:
        self.params, self.terms, self.scale = dict(params), terms, scale

    def penalty(self) -> Tensor:
        total = sum(
            (weight * (self.params[name] - anchor[name]).pow(2)).sum()
            for importance, anchor in self.terms
            for name, weight in importance.items()
        )
        return self.scale * total

    def extra_loss(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> Optional[Tensor]:
        return self.penalty() if self.terms else None


class RegularizedLearner(SharedEncoderLearner):
    """A shared encoder with the scenario's heads (as ``finetune``), and the parameters a penalty can hold."""

    method: ClassVar[str] = ""
    needs_classification: ClassVar[bool] = False  # a softmax over classes: the Fisher's, or the distilled outputs

    def train_model(self, k: int, st: Any) -> nn.Module:
        if self.needs_classification and st.task.type_name != "classification":
            raise UserError(
                f"continual method {self.method!r} needs classification stages (a softmax over classes); stage "
                f"{st.name!r} is a {st.task.type_name} task; use si or finetune"
            )
        return super().train_model(k, st)

    def parameters_by_name(self) -> Dict[str, nn.Parameter]:
        """Every parameter of the encoder and the heads by a name that stays the same through the sequence."""
        named = {f"encoder.{n}": p for n, p in self.encoder.named_parameters()}
        for task, head in self.heads.items():
            named.update({f"heads.{task}.{n}": p for n, p in head.named_parameters()})
        return named

    def regularized(self) -> Dict[str, nn.Parameter]:
        """The parameters later tasks train and a penalty holds: the encoder's, and outside the task scenario (where
        each head is its task's own and frozen after it) the heads'."""
        return {
            n: p
            for n, p in self.parameters_by_name().items()
            if p.requires_grad and (self.scenario != "task" or n.startswith("encoder."))
        }

    def seed(self, k: int) -> int:
        """The seed of task k's own random draws (train.seed and k)."""
        return (self.top.train.seed * 1_000_003 + 7_919 * (k + 1)) % 2**62

    def _to_device(self, tensors: Mapping[str, Tensor]) -> Params:
        return {n: t.to(self.device) for n, t in tensors.items()}


@LEARNERS.register("ewc")
class EWC(RegularizedLearner):
    """Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
    PNAS 2017), eq. 3 with a separate penalty for each previous task (as the paper does for more than two tasks):

        L(theta) = L_k(theta) + sum_{i<k} lambda/2 sum_j F_{i,j} (theta_j - theta*_{i,j})^2

    ``theta*_i``: the weights task i ended with; ``F_i``: the diagonal of the Fisher information there (eval mode),
    from per-sample gradients over ``fisher_samples`` of task i's training samples (null: all, one pass of the
    training loader, shuffled with a seed of train.seed and i). ``fisher: exact`` is the Fisher the paper defines,
    the expectation over labels drawn from the model's own predictive distribution, computed exactly (a sum over the
    classes, no draws); ``empirical`` uses the data's labels instead. ``lambda_``: the paper tunes it per experiment
    and gives no single value; 1000 did best of 100, 1000 and 10000 on configs/progressive.yaml (10 epochs a task,
    one seed). Tune it for other data, as the paper did.
    """

    method = "ewc"
    needs_classification = True

    def __init__(
        self,
        top: Config,
        device: torch.device,
        *,
        lambda_: float = 1000.0,
        fisher: str = "exact",
        fisher_samples: Optional[int] = None,
    ) -> None:
        super().__init__(top, device)
        m = self.method
        _check(m, "lambda_", _number(lambda_) and lambda_ >= 0, lambda_, "a number >= 0")
        _check(m, "fisher", fisher in ("exact", "empirical"), fisher, "exact (the Fisher) or empirical (data labels)")
        whole = isinstance(fisher_samples, int) and not isinstance(fisher_samples, bool)
        ok = fisher_samples is None or (whole and fisher_samples >= 1)
        _check(m, "fisher_samples", ok, fisher_samples, "an integer >= 1 or null (all)")
        self.lambda_, self.fisher, self.fisher_samples = float(lambda_), fisher, fisher_samples
        self.fishers: List[Params] = []  # one per penalty term
        self.anchors: List[Params] = []

    def extension(self, k: int, st: Any) -> Optional[StepExtension]:
        if not self.fishers:
            return None
        return QuadraticPenalty(self.regularized(), self.penalty_terms(), self.lambda_ / 2)

    def penalty_terms(self) -> List[Tuple[Params, Params]]:
        return list(zip(self.fishers, self.anchors))

    def end_task(self, k: int, st: Any, model: nn.Module) -> None:
        fisher = self.fisher_information(k, st, model)
        self.consolidate(fisher, {n: p.detach().clone() for n, p in self.regularized().items()})

    def consolidate(self, fisher: Params, anchor: Params) -> None:
        self.fishers.append(fisher)
        self.anchors.append(anchor)

    def fisher_information(self, k: int, st: Any, model: nn.Module) -> Params:
        """F at the weights task k ended with, over its training samples; every random state is left as it was."""
        offset = self.offsets[st.name] if self.scenario == "class" else 0  # the one head's labels of this task
        seed = self.seed(k)
        with torch.random.fork_rng(devices=[]):  # per-item augmentation draws from the global CPU generator
            torch.manual_seed(seed)
            loader = reshuffled(st.loaders["train"], torch.Generator().manual_seed(seed))
            batches, empirical = self._samples(loader, st.name, offset), self.fisher == "empirical"
            return fisher_diagonal(model, self.regularized(), batches, lambda out: out[st.name], empirical)

    def _samples(self, loader: Iterable[Any], name: str, offset: int) -> Iterator[Tuple[Tensor, Tensor]]:
        left = self.fisher_samples
        for batch in loader:
            x, y = batch["image"].to(self.device), batch["targets"][name].to(self.device) + offset
            if left is not None:
                x, y = x[:left], y[:left]
                left -= y.shape[0]
            yield x, y
            if left == 0:
                return

    def state_dict(self) -> Dict[str, Any]:
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fishers = [self._to_device(f) for f in state["fishers"]]
        self.anchors = [self._to_device(a) for a in state["anchors"]]


@LEARNERS.register("online_ewc")
class OnlineEWC(EWC):
    """Online EWC (Schwarz et al., "Progress & Compress: A scalable framework for continual learning", ICML 2018,
    the online EWC of its compress phase): one running Fisher instead of one per task, and one anchor,

        F*_k = gamma F*_{k-1} + F_k,   theta*_k = the weights task k ended with,
        L(theta) = L_k(theta) + lambda/2 sum_j gamma F*_{k-1,j} (theta_j - theta*_{k-1,j})^2

    (the penalty's precision is ``gamma F*_{k-1}``, as the paper writes it). ``gamma`` < 1 forgets old tasks
    gradually; the default 1.0 (no decay) is van de Ven et al.'s (2019/2022) setting for online EWC, not checked
    against the paper's tables. F, ``fisher`` and ``fisher_samples`` as for ``ewc``.
    """

    method = "online_ewc"

    def __init__(
        self,
        top: Config,
        device: torch.device,
        *,
        lambda_: float = 1000.0,
        gamma: float = 1.0,
        fisher: str = "exact",
        fisher_samples: Optional[int] = None,
    ) -> None:
        super().__init__(top, device, lambda_=lambda_, fisher=fisher, fisher_samples=fisher_samples)
        _check(self.method, "gamma", _number(gamma) and 0 < gamma <= 1, gamma, "in (0, 1]")
        self.gamma = float(gamma)

    def penalty_terms(self) -> List[Tuple[Params, Params]]:
        return [({n: self.gamma * f for n, f in self.fishers[0].items()}, self.anchors[0])]

    def consolidate(self, fisher: Params, anchor: Params) -> None:
        running = {n: self.gamma * f for n, f in (self.fishers[0] if self.fishers else {}).items()}
        for n, f in fisher.items():
            running[n] = running[n] + f if n in running else f
        self.fishers = [running]
        self.anchors = [anchor]


class PathIntegral(QuadraticPenalty):
    """SI during one task: the surrogate loss ``c sum_j Omega_j (theta_j - anchor_j)^2`` of the tasks before, and the
    path integral ``omega_j = -sum_t g_j(t) Delta theta_j(t)`` of this task over the parameters it trains (``params``),
    with g the gradient of the task loss alone (the surrogate's own gradient, known in closed form, is taken off) and
    Delta theta the update the optimizer applied. ``omega`` and the task's starting weights are checkpointed."""

    def __init__(self, params: Mapping[str, Tensor], omega: Params, anchor: Params, c: float) -> None:
        super().__init__(params, [(omega, anchor)] if omega else [], c)
        self.importance, self.anchor, self.c = omega, anchor, c
        self.omega = {n: torch.zeros_like(p, dtype=p.dtype).detach() for n, p in self.params.items()}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self._grad: Params = {}
        self._before: Params = {}

    def before_update(self, model: nn.Module) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                if n in self.importance:
                    g -= 2 * self.c * self.importance[n] * (p - self.anchor[n])
                self._grad[n], self._before[n] = g, p.detach().clone()

    def after_update(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                self.omega[n] -= self._grad[n] * (p - self._before[n])

    def state_dict(self) -> Dict[str, Any]:
        return {"omega": self.omega, "start": self.start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for n in self.params:
            self.omega[n].copy_(state["omega"][n])
            self.start[n].copy_(state["start"][n])


@LEARNERS.register("si")
class SI(RegularizedLearner):
    """Synaptic Intelligence (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017),
    eqs. 4-5: while task k trains, ``omega_j += -g_j(t) Delta theta_j(t)`` at every update; when it ends,

        Omega_j <- max(0, Omega_j + omega_j / ((Delta_j)^2 + xi)),   Delta_j = theta_j(end of k) - theta_j(start of k)

    and later tasks add the surrogate loss ``c sum_j Omega_j (theta~_j - theta_j)^2`` (theta~: the weights task k
    ended with). g is the gradient of the task loss without the surrogate ("unreg_grads" in the authors' code,
    github.com/ganguli-lab/pathint), and the clamp at 0 is theirs too (a ReLU on Omega). Defaults c = 1 and
    xi = 1e-3: the authors' split MNIST setting (their permuted MNIST used xi = 0.1).
    """

    method = "si"

    def __init__(self, top: Config, device: torch.device, *, c: float = 1.0, xi: float = 1e-3) -> None:
        super().__init__(top, device)
        _check(self.method, "c", _number(c) and c >= 0, c, "a number >= 0")
        _check(self.method, "xi", _number(xi) and xi > 0, xi, "a number > 0")
        self.c, self.xi = float(c), float(xi)
        self.importance: Params = {}  # Omega
        self.anchor: Params = {}  # theta~
        self.path: Optional[Tuple[int, PathIntegral]] = None  # the running task's

    def extension(self, k: int, st: Any) -> Optional[StepExtension]:
        path = PathIntegral(self.regularized(), self.importance, self.anchor, self.c)
        self.path = (k, path)
        return path

    def end_task(self, k: int, st: Any, model: nn.Module) -> None:
        if self.path is None or self.path[0] != k:
            raise RuntimeError(f"si: task {k} ended without its path integral (extension) having run")
        path = self.path[1]
        with torch.no_grad():
            for n, p in path.params.items():
                added = path.omega[n] / ((p.detach() - path.start[n]).pow(2) + self.xi)
                self.importance[n] = (self.importance[n] + added if n in self.importance else added).clamp(min=0)
                self.anchor[n] = p.detach().clone()
        self.path = None

    def state_dict(self) -> Dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.importance = self._to_device(state["importance"])
        self.anchor = self._to_device(state["anchor"])


class Distillation(StepExtension):
    """LwF's term during one task: ``lambda_o sum_old KD(new outputs, old outputs)`` on the new task's inputs, the old
    outputs from ``old`` (the model at the end of the previous task, eval mode, no gradient). ``pairs`` maps each old
    output to the new model's output it is compared with; the new one is cut to the old one's classes."""

    def __init__(self, old: nn.Module, pairs: Mapping[str, str], temperature: float, lambda_o: float) -> None:
        self.old, self.pairs, self.temperature, self.lambda_o = old, dict(pairs), temperature, lambda_o

    def extra_loss(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> Optional[Tensor]:
        with torch.no_grad():
            recorded = self.old(x)
        total = sum(
            distillation_loss(outputs[new][:, : recorded[old].shape[1]], recorded[old], self.temperature)
            for old, new in self.pairs.items()
        )
        return self.lambda_o * total


@LEARNERS.register("lwf")
class LwF(RegularizedLearner):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), eqs. 2-3: on the new task's inputs,

        L = L_new(y_n, yhat_n) + lambda_o sum_old L_old(y_o, yhat_o),   L_old = -sum_i y'_o(i) log yhat'_o(i)

    with ``y_o`` the outputs of the model as the previous task ended (recorded on each batch) and ``y'`` the
    probabilities raised to 1/T and renormalised (L_old: eq. 2, y': eq. 3). Task scenario: every old task's head is
    distilled and, as in the paper, trained along (theta_o; the paper's optional warm-up of the new head alone is not
    done). Class scenario: the old classes' outputs of the one head (as van de Ven & Tolias 2019 do for
    class-incremental LwF). Domain scenario: the one head's outputs. Defaults T = 2 and lambda_o = 1: the paper's.
    """

    method = "lwf"
    needs_classification = True

    def __init__(self, top: Config, device: torch.device, *, temperature: float = 2.0, lambda_o: float = 1.0) -> None:
        super().__init__(top, device)
        _check(self.method, "temperature", _number(temperature) and temperature > 0, temperature, "a number > 0")
        _check(self.method, "lambda_o", _number(lambda_o) and lambda_o >= 0, lambda_o, "a number >= 0")
        self.temperature, self.lambda_o = float(temperature), float(lambda_o)
        self.old: Optional[TransferModel] = None

    def train_model(self, k: int, st: Any) -> nn.Module:
        model = super().train_model(k, st)
        if self.scenario != "task":
            return model
        for head in self.heads.values():  # theta_o trains too: a model with every head gives their outputs
            head.requires_grad_(True)
        return TransferModel(self.encoder, dict(self.heads))

    def extension(self, k: int, st: Any) -> Optional[StepExtension]:
        if self.old is None:
            return None
        pairs = {name: name if self.scenario == "task" else st.name for name in self.old.heads}
        return Distillation(self.old, pairs, self.temperature, self.lambda_o)

    def end_task(self, k: int, st: Any, model: nn.Module) -> None:
        self.old = self._copy()

    def _copy(self) -> TransferModel:
        """A frozen copy of the encoder and the heads as they are now, as the model of the previous task."""
        encoder = copy.deepcopy(self.encoder)
        if self.scenario == "class":
            heads: Dict[str, nn.Module] = {"old": ConcatHeads([copy.deepcopy(h) for h in self.heads.values()])}
        elif self.scenario == "domain":
            heads = {"old": copy.deepcopy(next(iter(self.heads.values())))}
        else:
            heads = {name: copy.deepcopy(h) for name, h in self.heads.items()}
        old = TransferModel(encoder, heads).eval()
        old.requires_grad_(False)
        return old

    def state_dict(self) -> Dict[str, Any]:
        return {"old": self.old.state_dict()} if self.old is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "old" in state:
            self.old = self._copy()
            self.old.load_state_dict(state["old"])
