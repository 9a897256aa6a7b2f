"""Mixture-of-experts architectures: MMoE, CGC, DSelect-k (experts are whole encoders) and PLE (experts per stage).

Every expert is a copy of the configured encoder (``make_encoder``: the same pretrained weights, or a fresh random
initialisation), and every gate reads its input flattened, ``softmax(W x)``, as in the papers (where ``x`` is the
input feature vector) and LibMTL. Gates and task experts belong to their task; shared experts are shared. A task's
features are the gate-weighted sums of its experts' stage maps and pooled ``"out"`` vectors.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.models.arch import Architecture, register_arch
from mtl.models.stages import run_chain, stage_chain


def _count(value: object, what: str, arch: str, *, power_of_two: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"model.arch_options.{what} for {arch} must be a positive integer, got {value!r}")
    if power_of_two and value & (value - 1):
        raise UserError(
            f"model.arch_options.{what} for {arch} must be a power of 2 (1, 2, 4, 8, ...), got {value}: with other "
            f"counts DSelect-k's binary codes can select experts that do not exist"
        )
    return value


def _weighted(weights: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``sum_k weights[:, k] * tensors[k]`` (weights: (B, K), each tensor batch first)."""
    stacked = torch.stack(list(tensors), dim=1)  # (B, K, ...)
    w = weights.reshape(*weights.shape, *([1] * (stacked.dim() - 2))).to(stacked.dtype)
    return (w * stacked).sum(1)


def _mix(weights: Tensor, outputs: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """``sum_k weights[:, k] * outputs[k][key]`` for every key (weights: (B, K))."""
    return {key: _weighted(weights, [o[key] for o in outputs]) for key in outputs[0]}


def _experts(encoder: nn.Module, make_encoder: Callable[[], nn.Module], n: int) -> nn.ModuleList:
    return nn.ModuleList([encoder] + [make_encoder() for _ in range(n - 1)])


def _gate(in_features: int, n: int) -> nn.Linear:
    return nn.Linear(in_features, n)


class _ExpertsBase(Architecture):
    """Shared experts run in ``forward``; the representation is their outputs and the input (for the gates)."""

    representation = "the shared experts' outputs (every stage map and pooled vector of each shared expert)"

    def __init__(self, encoder: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__(encoder, tasks)
        self.out_dim = encoder.out_dim

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        rep = {"input": x}
        for k, expert in enumerate(self.shared):
            rep |= {f"shared{k}.{key}": v for key, v in expert(x).items()}
        return rep

    def _shared_outputs(self, rep: Dict[str, Tensor]) -> List[Dict[str, Tensor]]:
        return [
            {key.partition(".")[2]: v for key, v in rep.items() if key.startswith(f"shared{k}.")}
            for k in range(len(self.shared))
        ]


@register_arch("mmoe")
class MMoE(_ExpertsBase):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018, eq. 5-6): ``f^k(x) = sum_i g^k(x)_i f_i(x)`` with
    ``g^k(x) = softmax(W_gk x)``; experts ``f_i`` are ``num_experts`` (4) encoders shared by every task."""

    def __init__(
        self,
        encoder: nn.Module,
        make_encoder: Callable[[], nn.Module],
        tasks: Sequence[str],
        input_size: Sequence[int],
        num_experts: int = 4,
    ) -> None:
        super().__init__(encoder, tasks)
        n = _count(num_experts, "num_experts", "mmoe")
        self.shared = _experts(encoder, make_encoder, n)
        self.gates = nn.ModuleDict({t: _gate(math.prod(input_size), n) for t in self.tasks})

    def task_modules(self) -> List[nn.Module]:
        return [self.gates]

    def split(self, rep: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
        x = rearrange(rep["input"], "b ... -> b (...)")
        outputs = self._shared_outputs(rep)
        return {t: _mix(self.gates[t](x).softmax(-1), outputs) for t in self.tasks}


@register_arch("cgc")
class CGC(_ExpertsBase):
    """Customized Gate Control (Tang et al., RecSys 2020, eq. 1-3): task k's features are
    ``w^k(x) S^k(x)``, ``w^k(x) = softmax(W_g^k x)`` over ``S^k(x)`` = task k's own ``task_experts`` (1) and the
    ``shared_experts`` (1) encoders."""

    def __init__(
        self,
        encoder: nn.Module,
        make_encoder: Callable[[], nn.Module],
        tasks: Sequence[str],
        input_size: Sequence[int],
        shared_experts: int = 1,
        task_experts: int = 1,
    ) -> None:
        super().__init__(encoder, tasks)
        n_shared = _count(shared_experts, "shared_experts", "cgc")
        n_task = _count(task_experts, "task_experts", "cgc")
        self.shared = _experts(encoder, make_encoder, n_shared)
        self.task_experts = nn.ModuleDict({t: nn.ModuleList(make_encoder() for _ in range(n_task)) for t in self.tasks})
        self.gates = nn.ModuleDict({t: _gate(math.prod(input_size), n_task + n_shared) for t in self.tasks})

    def task_modules(self) -> List[nn.Module]:
        return [self.task_experts, self.gates]

    def split(self, rep: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
        x = rep["input"]
        flat = rearrange(x, "b ... -> b (...)")
        shared = self._shared_outputs(rep)
        out = {}
        for t in self.tasks:
            own = [expert(x) for expert in self.task_experts[t]]
            out[t] = _mix(self.gates[t](flat).softmax(-1), own + shared)
        return out


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """DSelect-k's smooth step (Hazimeh et al. 2021, eq. 3): 0 below -gamma/2, 1 above gamma/2, and
    ``-2/gamma^3 t^3 + 3/(2 gamma) t + 1/2`` in between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


@register_arch("dselect_k")
class DSelectK(_ExpertsBase):
    """DSelect-k (Hazimeh et al., NeurIPS 2021, eq. 4-6, per-example gates): each of a task's ``k`` (2) selectors
    picks one of the ``num_experts`` (4, a power of 2) shared encoders through ``m = log2(n)`` smooth-step bits,
    ``r(z)_i = prod_l (S(z_l) if bit l of i else 1 - S(z_l))``, and the selectors are mixed by
    ``softmax(W_w x)``: ``q = sum_j alpha_j r(z^(j))``, task features ``sum_i q_i f_i(x)`` with ``z = W_z x``.
    ``gamma`` (1) is the smooth step's width; initialisation as the authors' code (``W_z`` uniform in
    ``+-gamma/100``, ``W_w`` in ``+-0.05``). The optional entropy regulariser of the paper is not implemented."""

    def __init__(
        self,
        encoder: nn.Module,
        make_encoder: Callable[[], nn.Module],
        tasks: Sequence[str],
        input_size: Sequence[int],
        num_experts: int = 4,
        k: int = 2,
        gamma: float = 1.0,
    ) -> None:
        super().__init__(encoder, tasks)
        n = _count(num_experts, "num_experts", "dselect_k", power_of_two=True)
        self.k = _count(k, "k", "dselect_k")
        if not isinstance(gamma, (int, float)) or gamma <= 0:
            raise UserError(f"model.arch_options.gamma for dselect_k must be a positive number, got {gamma!r}")
        self.gamma = float(gamma)
        self.bits = max(int(math.log2(n)), 1) if n > 1 else 0
        self.shared = _experts(encoder, make_encoder, n)
        d = math.prod(input_size)
        self.z = nn.ModuleDict({t: nn.Linear(d, self.k * self.bits) for t in self.tasks}) if self.bits else None
        self.w = nn.ModuleDict({t: nn.Linear(d, self.k) for t in self.tasks})
        with torch.no_grad():
            for p in self.z.parameters() if self.z is not None else ():
                p.uniform_(-self.gamma / 100, self.gamma / 100)
            for p in self.w.parameters():
                p.uniform_(-0.05, 0.05)
        codes = torch.tensor([[(i >> (self.bits - 1 - b)) & 1 for b in range(self.bits)] for i in range(n)])
        self.register_buffer("codes", codes.bool(), persistent=False)  # (n, m): expert i's binary code

    def task_modules(self) -> List[nn.Module]:
        return [m for m in (self.z, self.w) if m is not None]

    def expert_weights(self, task: str, x: Tensor) -> Tensor:
        """(B, n) weights ``q`` of the experts for ``task``."""
        flat = rearrange(x, "b ... -> b (...)")
        alpha = self.w[task](flat).softmax(-1)  # (B, k)
        if not self.bits:
            return alpha.sum(-1, keepdim=True)
        s = smooth_step(rearrange(self.z[task](flat), "b (k m) -> b k 1 m", k=self.k), self.gamma)
        r = torch.where(self.codes, s, 1 - s).prod(-1)  # (B, k, n)
        return torch.einsum("bk,bkn->bn", alpha, r)

    def split(self, rep: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
        outputs = self._shared_outputs(rep)
        return {t: _mix(self.expert_weights(t, rep["input"]), outputs) for t in self.tasks}


@register_arch("ple")
class PLE(Architecture):
    """Progressive Layered Extraction (Tang et al., RecSys 2020, eq. 4-5) over the encoder's stages.

    Level j is stage j: each task has ``task_experts`` (1) copies of it and the shared stream ``shared_experts`` (1).
    Task k's stream: ``x_k^j = softmax(W_k^j x_k^{j-1}) [E_k^j(x_k^{j-1}), E_s^j(s^{j-1})]``; the shared stream,
    below the last level: ``s^j = softmax(W_s^j s^{j-1}) [E_1^j(x_1^{j-1}), ..., E_T^j(x_T^{j-1}), E_s^j(s^{j-1})]``;
    ``x_k^0 = s^0`` = the image (gates read their input flattened). Task k's features are its stream's stage maps.
    The last level's task experts and gates belong to their task; every other parameter reaches several tasks'
    losses through the shared stream, so it is shared. No tensor is shared by every task at the output, so
    ``grad_on: representation`` is refused.
    """

    def __init__(
        self,
        encoder: nn.Module,
        make_encoder: Callable[[], nn.Module],
        tasks: Sequence[str],
        input_size: Sequence[int],
        shared_experts: int = 1,
        task_experts: int = 1,
    ) -> None:
        super().__init__(encoder, tasks)
        n_shared = _count(shared_experts, "shared_experts", "ple")
        n_task = _count(task_experts, "task_experts", "ple")
        chains = {t: [stage_chain(make_encoder(), "ple") for _ in range(n_task)] for t in self.tasks}
        shared = [stage_chain(encoder if k == 0 else make_encoder(), "ple") for k in range(n_shared)]
        self.levels = len(shared[0])
        self.stage_names = [info["name"] for info in self.feature_info]
        self.out_dim = self.feature_info[-1]["channels"]
        sizes = _level_input_sizes(shared[0], input_size)
        self.task_experts = nn.ModuleList(
            nn.ModuleDict({t: nn.ModuleList(c[j] for c in chains[t]) for t in self.tasks}) for j in range(self.levels)
        )
        self.shared_experts = nn.ModuleList(nn.ModuleList(c[j] for c in shared) for j in range(self.levels))
        self.task_gates = nn.ModuleList(
            nn.ModuleDict({t: _gate(sizes[j], n_task + n_shared) for t in self.tasks}) for j in range(self.levels)
        )
        everyone = len(self.tasks) * n_task + n_shared
        self.shared_gates = nn.ModuleList(_gate(sizes[j], everyone) for j in range(self.levels - 1))

    def task_modules(self) -> List[nn.Module]:
        return [self.task_experts[-1], self.task_gates[-1]]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        streams = {t: x for t in self.tasks}
        shared = x
        rep = {}
        for j in range(self.levels):
            own = {t: [e(streams[t]) for e in self.task_experts[j][t]] for t in self.tasks}
            common = [e(shared) for e in self.shared_experts[j]]
            new = {}
            for t in self.tasks:
                gate = self.task_gates[j][t](rearrange(streams[t], "b ... -> b (...)")).softmax(-1)
                new[t] = _weighted(gate, own[t] + common)
            if j < self.levels - 1:
                everyone = [o for t in self.tasks for o in own[t]] + common
                gate = self.shared_gates[j](rearrange(shared, "b ... -> b (...)")).softmax(-1)
                shared = _weighted(gate, everyone)
            streams = new
            rep |= {f"{t}.{self.stage_names[j]}": new[t] for t in self.tasks}
        return rep

    def split(self, rep: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
        return _per_task(rep, self.tasks, self.stage_names)


def _per_task(rep: Dict[str, Tensor], tasks: Sequence[str], stage_names: Sequence[str]) -> Dict[str, Dict[str, Tensor]]:
    """``{task: {stage: rep[task.stage], "out": mean of the last map}}``."""
    out = {}
    for t in tasks:
        out[t] = {s: rep[f"{t}.{s}"] for s in stage_names}
        out[t]["out"] = out[t][stage_names[-1]].mean(dim=(-2, -1))
    return out


def _level_input_sizes(chain: nn.ModuleList, input_size: Sequence[int]) -> List[int]:
    """The flattened size of each stage's input, by a dry run."""
    p = next(chain.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    was = [m.training for m in chain]
    chain.eval()
    with torch.no_grad():
        maps = run_chain(chain, x)
    for m, mode in zip(chain, was):
        m.train(mode)
    return [math.prod(input_size)] + [m[0].numel() for m in maps[:-1]]
