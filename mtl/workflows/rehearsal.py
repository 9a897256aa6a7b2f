"""Rehearsal learners: experience replay (``er``), Dark Experience Replay++ (``derpp``) and Averaged GEM (``agem``).

Each keeps stored training samples (at most ``continual.buffer_size`` in all) and replays them through the heads
they were learnt with: task ``j``'s own head in the ``task`` scenario, the one growing head with task ``j``'s labels
at their offset in ``class``, the one head in ``domain``. A sample is stored as the loader gave it (the augmented
input on the device), with its local label, its task index and, for DER++, the logits it had. The stream is every
batch trained on, in order: with several epochs each image is offered once per epoch (and may be held twice).

Random draws (reservoir decisions, replay batches) use a ``torch.Generator`` seeded from ``train.seed`` and the task
index, kept with the buffer in the extension's state within a task (``last.pt``) and in the learner's across tasks
(``learner.pt``), so a run killed in the middle of a task resumes exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.engine.extension import StepExtension
from mtl.tasks.base import Task
from mtl.workflows.learners import LEARNERS, SharedEncoderLearner

Batch = Dict[str, Tensor]
HOST_FIELDS = ("task", "width")  # bookkeeping kept on the CPU: grouping a batch by task needs no device sync


def seeded(seed: int, k: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for task ``k`` of a run seeded ``seed`` (``stream`` tells apart two uses in one task)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + k) * 2 + stream)


class ReservoirBuffer:
    """At most ``capacity`` samples of a stream, by reservoir sampling (Vitter 1985, Algorithm R): the ``i``-th
    sample seen (0-based) goes to slot ``i`` while ``i < capacity``; after that it replaces slot ``j`` drawn uniformly
    from ``0..i`` when ``j < capacity``, else it is dropped. Every sample of the stream is then held with the same
    probability ``capacity / seen``.

    A sample is a set of named fields (``x``, ``y``, ``task``, ``logits``, ...), each a tensor whose first dimension
    counts samples; each field stays on the device it came from. ``logits`` may grow wider (a class-incremental head):
    narrower rows are padded with zeros, and ``width`` (added with them) says how many columns of a row are real.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = int(capacity), device
        self.seen = 0
        self.fields: Dict[str, Tensor] = {}

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, generator: torch.Generator, **batch: Tensor) -> None:
        """Offer a batch to the buffer, sample by sample in order (a later one may replace an earlier one)."""
        b = next(iter(batch.values())).shape[0]
        if "logits" in batch:
            batch["width"] = torch.full((b,), batch["logits"].shape[1], dtype=torch.long)
        positions = torch.arange(self.seen, self.seen + b, dtype=torch.float64)
        draws = (torch.rand(b, generator=generator, dtype=torch.float64) * (positions + 1)).floor().long().tolist()
        slots: Dict[int, int] = {}  # slot -> the batch row that ends there
        for row, (i, j) in enumerate(zip(range(self.seen, self.seen + b), draws)):
            slot = i if i < self.capacity else j
            if slot < self.capacity:
                slots[slot] = row
        self.seen += b
        if not slots:
            return
        dst, src = torch.tensor(list(slots)), torch.tensor(list(slots.values()))
        for name, value in batch.items():
            value = self._fit(name, value.detach())
            store = self.fields[name]
            store[dst.to(store.device)] = value[src.to(value.device)].to(store.dtype)

    def _fit(self, name: str, value: Tensor) -> Tensor:
        """``value`` shaped like the stored field (allocated on first use; ``logits`` padded to the wider)."""
        store = self.fields.get(name)
        if store is None:
            self.fields[name] = value.new_zeros((self.capacity, *value.shape[1:]))
            return value
        if name == "logits" and value.shape[1] != store.shape[1]:
            wider = max(value.shape[1], store.shape[1])
            self.fields[name] = F.pad(store, (0, wider - store.shape[1]))
            return F.pad(value, (0, wider - value.shape[1]))
        if value.shape[1:] != store.shape[1:]:
            raise UserError(
                f"replay buffer: a {name} of shape {tuple(value.shape[1:])} cannot join the stored "
                f"{tuple(store.shape[1:])}; rehearsal methods need one image size (data.image_size) and one target "
                "shape in every stage"
            )
        return value

    def items(self) -> Batch:
        """Every stored sample, in slot order."""
        return {name: v[: len(self)] for name, v in self.fields.items()}

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """``min(n, len)`` stored samples drawn uniformly without replacement."""
        idx = torch.randperm(len(self), generator=generator)[:n]
        return {name: v[idx.to(v.device)] for name, v in self.fields.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {"seen": self.seen, "fields": {name: v.clone() for name, v in self.items().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen, self.fields = int(state["seen"]), {}
        for name, value in state["fields"].items():
            store = value.new_zeros((self.capacity, *value.shape[1:]))
            store[: value.shape[0]] = value
            self.fields[name] = store if name in HOST_FIELDS else store.to(self.device)


class Rehearsal(SharedEncoderLearner):
    """A shared encoder with the scenario's heads (as ``finetune``) that can replay stored samples of any task."""

    method: ClassVar[str]  # the registered name, for messages

    def __init__(self, top: Config, device: torch.device, replay_batch_size: Optional[int]) -> None:
        super().__init__(top, device)
        size = replay_batch_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise UserError(
                f"continual.options.{self.method}.replay_batch_size must be an integer >= 1 (or null: "
                f"data.batch_size), got {replay_batch_size!r}"
            )
        self.replay_batch_size = replay_batch_size
        self.names: Dict[int, str] = {}  # task index -> stage name
        self.replay_tasks: Dict[int, Task] = {}  # task index -> the task its samples are scored with

    def train_model(self, k: int, st: Any) -> nn.Module:
        model = super().train_model(k, st)
        self.names[k] = st.name
        self.replay_tasks[k] = self.task(k, st)
        return model

    def batch_size(self, st: Any) -> int:
        return self.replay_batch_size or int(st.cfg.data.batch_size)

    def replay_outputs(self, x: Tensor, task: Tensor) -> List[Tuple[Tensor, Tensor, int]]:
        """Stored inputs ``x`` of tasks ``task`` (a CPU tensor) through the encoder once, then each through the head its
        task is predicted with now: ``(rows, outputs, j)`` per task ``j`` in the batch."""
        pooled = self.encoder(x)["out"]
        groups = []
        for j in task.unique().tolist():
            rows = (task == j).nonzero().flatten()
            groups.append((rows, self.head_for(self.names[j])(pooled[rows.to(pooled.device)]), j))
        return groups

    def replay_loss(self, batch: Batch) -> Tensor:
        """The mean task loss over a stored batch, each sample scored as its task is (its local label on its own head,
        or at its offset of the class-incremental head)."""
        total = 0.0
        for rows, out, j in self.replay_outputs(batch["x"], batch["task"]):
            total = total + rows.numel() * self.replay_tasks[j].loss(out, batch["y"][rows.to(out.device)])
        return total / batch["task"].numel()


class BufferExtension(StepExtension):
    """Adds every trained batch of task ``k`` to ``buffer`` after its update; replay batches come from it."""

    def __init__(self, learner: Rehearsal, k: int, st: Any, buffer: ReservoirBuffer) -> None:
        self.learner, self.k, self.name, self.buffer = learner, k, st.name, buffer
        self.task = learner.task(k, st)
        self.batch_size = learner.batch_size(st)
        self.generator = seeded(learner.top.train.seed, k)

    def stored(self, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> Batch:
        return {"x": x, "y": targets[self.name], "task": torch.full((x.shape[0],), self.k, dtype=torch.long)}

    def after_update(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> None:
        self.buffer.add(self.generator, **self.stored(x, targets, outputs))

    def state_dict(self) -> Dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["rng"])


class ERExtension(BufferExtension):
    def extra_loss(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> Optional[Tensor]:
        if not len(self.buffer):
            return None
        replay = self.buffer.sample(self.batch_size, self.generator)
        n, m = x.shape[0], replay["task"].numel()
        current = self.task.loss(outputs[self.name], targets[self.name])  # the trainer's own term, weight 1
        # current + m/(n+m) (L_replay - current) = (n current + m L_replay) / (n+m): the mean over the union
        return m / (n + m) * (self.learner.replay_loss(replay) - current)


@LEARNERS.register("er")
class ExperienceReplay(Rehearsal):
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning", arXiv:1902.10486,
    Algorithm 1 with reservoir sampling): each step trains on the union of the current mini-batch ``B_n`` and a
    mini-batch ``B_M`` drawn from the memory ``M``, i.e. on the mean loss over ``B_n ∪ B_M``,

        (n L(B_n) + m L(B_M)) / (n + m),

    and then offers ``B_n`` to ``M`` (a reservoir over the whole stream, ``continual.buffer_size`` samples; the
    current task's samples can be replayed as well). ``replay_batch_size`` (``m``) defaults to ``data.batch_size``
    (the paper draws ``B_M`` of the size of ``B_n``). The replay batch takes a forward pass of its own: with
    BatchNorm, each half is normalised by its own batch statistics and both move the running statistics, where one
    forward over the union would use the union's.
    """

    method = "er"

    def __init__(self, top: Config, device: torch.device, *, replay_batch_size: Optional[int] = None) -> None:
        super().__init__(top, device, replay_batch_size)
        self.buffer = ReservoirBuffer(top.continual.buffer_size, device)

    def extension(self, k: int, st: Any) -> StepExtension:
        return ERExtension(self, k, st, self.buffer)

    def state_dict(self) -> Dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])


def logit_distance(groups: List[Tuple[Tensor, Tensor, int]], logits: Tensor, width: Tensor) -> Tensor:
    """The mean squared difference between the outputs of each group (``replay_outputs``) and the stored ``logits``,
    over the ``width`` stored columns of each row."""
    total, count = 0.0, 0
    for rows, out, _ in groups:
        w = width[rows]
        cols = int(w.max())
        z = logits[rows.to(logits.device), :cols]
        mask = (torch.arange(cols) < w[:, None]).to(out.device)
        total = total + ((out[:, :cols].float() - z) ** 2 * mask).sum()
        count += int(w.sum())
    return total / count


class DERPPExtension(BufferExtension):
    def __init__(self, learner: "DarkExperienceReplayPP", k: int, st: Any) -> None:
        super().__init__(learner, k, st, learner.buffer)
        self.alpha, self.beta = learner.alpha, learner.beta

    def stored(self, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> Batch:
        return {**super().stored(x, targets, outputs), "logits": outputs[self.name].detach().float()}

    def extra_loss(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> Optional[Tensor]:
        if not len(self.buffer):
            return None
        first = self.buffer.sample(self.batch_size, self.generator)
        second = self.buffer.sample(self.batch_size, self.generator)
        term = 0.0
        if self.alpha:
            groups = self.learner.replay_outputs(first["x"], first["task"])
            term = self.alpha * logit_distance(groups, first["logits"], first["width"])
        if self.beta:
            term = term + self.beta * self.learner.replay_loss(second)
        return term if isinstance(term, Tensor) else None


@LEARNERS.register("derpp")
class DarkExperienceReplayPP(Rehearsal):
    """Dark Experience Replay++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning: a
    Strong, Simple Baseline", eq. 6):

        L = L_cur + alpha * mean ||h(x') - z'||^2 + beta * CE(h(x''), y'')

    with ``(x', z')`` and ``(x'', y'')`` two independent replay batches (``replay_batch_size`` each, default
    ``data.batch_size``) from a reservoir buffer over the stream (``continual.buffer_size``); ``z'`` are the logits a
    sample had when it entered the buffer (the outputs of the training step's forward pass, stored after the update,
    as the authors' code does). The squared distance is averaged over the compared logits (the authors' ``mse_loss``).
    In the ``class`` scenario the head has grown since: only the classes a sample's logits were stored for (its first
    columns) are compared. Defaults ``alpha = 0.2``, ``beta = 1.0``: the authors' choice for Seq-MNIST with a
    200-sample buffer (mammoth, ``utils/best_args.py``, ``seq-mnist``/``derpp``/200).
    """

    method = "derpp"

    def __init__(
        self,
        top: Config,
        device: torch.device,
        *,
        alpha: float = 0.2,
        beta: float = 1.0,
        replay_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(top, device, replay_batch_size)
        for key, value in (("alpha", alpha), ("beta", beta)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UserError(f"continual.options.{self.method}.{key} must be a number >= 0, got {value!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.buffer = ReservoirBuffer(top.continual.buffer_size, device)

    def extension(self, k: int, st: Any) -> StepExtension:
        return DERPPExtension(self, k, st)

    def state_dict(self) -> Dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's eq. 11: ``g - (g.g_ref / g_ref.g_ref) g_ref`` when ``g.g_ref < 0``, else ``g`` (no host sync)."""
    dot = g @ g_ref
    coef = torch.where(dot < 0, dot / (g_ref @ g_ref).clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))
    return g - coef * g_ref


def memory_quotas(size: int, tasks: int) -> List[int]:
    """``size`` slots shared by ``tasks`` finished tasks: equal shares, the remainder to the earliest."""
    return [size // tasks + (j < size % tasks) for j in range(tasks)]


class AGEMExtension(BufferExtension):
    def __init__(self, learner: "AveragedGEM", k: int, st: Any) -> None:
        capacity = memory_quotas(learner.top.continual.buffer_size, k + 1)[k]
        super().__init__(learner, k, st, ReservoirBuffer(capacity, learner.device))

    def before_update(self, model: nn.Module) -> None:
        memory = self.learner.memory_batch(self.batch_size, self.generator)
        if memory is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        ref = torch.autograd.grad(self.learner.replay_loss(memory), params, allow_unused=True)
        kept = [(p, r) for p, r in zip(params, ref) if p.grad is not None or r is not None]
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p, _ in kept])
        g_ref = torch.cat([(r if r is not None else torch.zeros_like(p)).flatten() for p, r in kept])
        projected = agem_project(g, g_ref).split([p.numel() for p, _ in kept])
        for (p, _), new in zip(kept, projected):
            if p.grad is None:
                p.grad = new.view_as(p).clone()
            else:
                p.grad.copy_(new.view_as(p))


@LEARNERS.register("agem")
class AveragedGEM(Rehearsal):
    """Averaged Gradient Episodic Memory (Chaudhry et al., ICLR 2019, "Efficient Lifelong Learning with A-GEM",
    eq. 11): the gradient ``g`` of a step is replaced by

        g~ = g - (g^T g_ref / g_ref^T g_ref) g_ref   if g^T g_ref < 0,   else g,

    the closest vector to ``g`` whose inner product with ``g_ref`` is >= 0; ``g_ref`` is the gradient of the loss on a
    batch of ``replay_batch_size`` samples (default 256, the authors' ``EPS_MEM_BATCH_SIZE`` for MNIST and CIFAR;
    fewer while the memory holds fewer) drawn from the episodic memory of the finished tasks. Both are over every
    parameter that trains; the projection is made before gradient clipping and the optimizer's weight decay.

    Episodic memory: ``continual.buffer_size`` samples in equal shares per finished task. While task ``k`` trains, a
    reservoir over its training stream keeps ``buffer_size // (k + 1)`` of its samples; when it ends they join the
    memory in a random order and every earlier task keeps the first ``buffer_size // (k + 1)`` of its own (the
    remainder of the division goes to the earliest tasks), a uniform subset of what it held. The reference forward
    pass is in training mode: with BatchNorm it moves the running statistics as well.
    """

    method = "agem"

    def __init__(self, top: Config, device: torch.device, *, replay_batch_size: Optional[int] = 256) -> None:
        super().__init__(top, device, replay_batch_size)
        self.memory: List[Batch] = []  # per finished task: x, y, task
        self._all: Optional[Batch] = None  # the memory concatenated, built when first sampled
        self._current: Optional[AGEMExtension] = None

    def extension(self, k: int, st: Any) -> StepExtension:
        self._current = AGEMExtension(self, k, st)
        return self._current

    def memory_batch(self, n: int, generator: torch.Generator) -> Optional[Batch]:
        """``min(n, size)`` samples of the finished tasks' memory, uniformly without replacement; None when empty."""
        parts = [part for part in self.memory if part and part["task"].numel()]
        if not parts:
            return None
        if self._all is None:
            self._all = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        idx = torch.randperm(self._all["task"].numel(), generator=generator)[:n]
        return {key: v[idx.to(v.device)] for key, v in self._all.items()}

    def end_task(self, k: int, st: Any, model: nn.Module) -> None:
        ext = self._current
        if ext is None or ext.k != k:
            raise RuntimeError(f"agem: task {k} ended without its training extension")
        items = {key: v for key, v in ext.buffer.items().items() if key in ("x", "y", "task")}
        order = torch.randperm(len(ext.buffer), generator=seeded(self.top.train.seed, k, stream=1))
        self.memory.append({key: v[order.to(v.device)] for key, v in items.items()})  # {} when it kept nothing
        quotas = memory_quotas(self.top.continual.buffer_size, k + 1)
        self.memory = [{key: v[:q] for key, v in part.items()} for part, q in zip(self.memory, quotas)]
        self._all, self._current = None, None

    def state_dict(self) -> Dict[str, Any]:
        return {"memory": [{key: v.clone() for key, v in part.items()} for part in self.memory]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory = [
            {key: v if key in HOST_FIELDS else v.to(self.device) for key, v in part.items()} for part in state["memory"]
        ]
        self._all = None
