"""Knowledge distillation: train a compressed torch student to imitate its original, no labels.

Losses (Hinton et al. 2015; FitNets, Romero et al. 2015, for the hints):
- outputs that are class scores (2-D, more than one column): T^2 x KL(softmax(t / T) ||
  softmax(s / T)), `temperature` T; with `labels`, alpha x that + (1 - alpha) x cross-entropy;
- any other output (detector heads, embeddings, maps): mean squared error divided by the
  teacher output's variance (a relative error, so outputs of any scale weigh alike); 2-D
  outputs whose rows have unit L2 norm are embeddings (a sentence encoder's), not scores;
- `hints`: submodule paths present in both modules (a compressed model keeps its module paths:
  prune-channels slices modules in place). The student's output there goes through a learned
  adaptation layer (1x1 conv for feature maps, linear otherwise; identity-initialised where the
  widths agree) and is matched to the teacher's by relative MSE; the adaptation layers are
  dropped afterwards.
An output that is already a probability (rows of non-negative numbers summing to 1: an ONNX
file ending in Softmax) is compared through its logarithm. An ONNX student (graphslim.load, or
optimize's result on one) is lifted to torch (graphslim/frontends/onnx_lift.py), trained, and
lowered back to ONNX, checked against the trained module.
Adam with a cosine schedule over all steps; the student trains in train mode (its BatchNorms
re-estimate their statistics; `freeze_bn` keeps them in eval mode, the original's statistics
staying: by default with fewer than _REESTIMATE_BN samples), the teacher runs in eval mode
without gradients. Seeded shuffling and torch.manual_seed make a run repeat. The start and
each epoch are scored, by `metric` (a callable on the student module, higher is better) or by
the loss on a held-out `validate` share of the data; training stops when the score has not
improved for `patience` epochs, and the best weights are kept (the start's, where training
did not help: the demo CNN pruned losslessly and distilled on 200 digits fell from agreement
1.00 to 0.88 before this).

Hand-written around torch's own optimisers and losses: the peers' distillers (NNCF's, PaddleSlim's,
torchdistill) are tied to their trainers and configs; this is a loop of forty lines.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as _exc:  # an ONNX-only install
    raise ImportError("distillation needs torch: pip install 'graphslim-engine[torch]' (for "
                      "ONNX files 'graphslim-engine[onnx-distill]', which adds onnx2torch)"
                      ) from _exc

log = logging.getLogger(__name__)


#: samples from which the student's BatchNorms re-estimate their statistics by default
#: (freeze_bn=None): the demo CNN distilled on 200 digits (lr 1e-4, 5 epochs) fell from
#: output cosine 0.84 to 0.56 with them re-estimated and kept 0.84 frozen; the MNIST CNN on 4000
#: digits recovers 0.970 re-estimated, 0.966 frozen
_REESTIMATE_BN = 1000


def distill(student, teacher, data, *, epochs: int = 1, batch_size: int = 64, lr: float = 1e-3,
            temperature: float = 4.0, alpha: float = 0.9, hints: Sequence[str] = (),
            labels=None, device=None, metric: Callable | None = None, patience: int = 2,
            validate: float = 0.1, seed: int = 0, history: list | None = None,
            progress: bool | None = None, freeze_bn: bool | None = None):
    """Train `student` (an nn.Module or a graphslim fx model) towards `teacher` (an nn.Module, a
    graphslim model of either frontend: an ONNX teacher runs in ONNX Runtime) on `data`
    (an array, or input name -> array, samples first; unlabeled). Returns the student in the
    form it was given. `history`, when a list, receives one dict per epoch.

    The weights returned are the best of the start and every epoch: by `metric` (higher is
    better) where given, else by the distillation loss on `validate` (a fraction) of the
    data, held out from training; so a student the data cannot improve comes back as it was.
    Stops after `patience` epochs without a better score (PP-LCNet: 1 stopped at 0.75, 8 -> 1.0)."""
    module, given = _student_module(student)
    inputs = _inputs(data, module, student)
    n = len(next(iter(inputs.values())))
    _check(epochs, batch_size, lr, temperature, alpha, labels, n, validate)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    if freeze_bn is None:
        freeze_bn = n < _REESTIMATE_BN
        if freeze_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                             for m in module.modules()):
            log.info("distill: %d samples (< %d): BatchNorm statistics kept", n,
                     _REESTIMATE_BN)
    module.to(dev)
    run = _Run(module, _Teacher(teacher, dev), inputs, labels, dev, temperature, alpha, seed)
    run.adapters = _Adapters(module, run.teacher, hints, inputs, dev)
    train, held = run.split(validate if metric is None else 0.0)
    epoch = -1

    def score() -> float:  # higher is better
        if metric is not None:
            return float(metric(module))
        if len(held):
            return -run.loss_on(held)
        return float(epoch)  # too few samples to hold any out: the last epoch is kept

    best, best_state, stale = score(), copy.deepcopy(module.state_dict()), 0
    opt = torch.optim.Adam([*module.parameters(), *run.adapters.parameters()], lr=lr)
    steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    bar = _progress(steps, progress)
    for epoch in range(epochs):
        started = time.perf_counter()
        loss = run.epoch(train, batch_size, opt, sched, bar, freeze_bn)
        record = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - started}
        value = score()
        if metric is not None:
            record["metric"] = value
        elif len(held):
            record["val_loss"] = -value
        log.info("distill epoch %d: %s", epoch, record)
        if history is not None:
            history.append(record)
        if value > best:
            best, best_state, stale = value, copy.deepcopy(module.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    run.adapters.remove()
    module.load_state_dict(best_state)
    module.to("cpu").eval()
    return given(module)


class _Run:
    """One distillation: the student, its teacher, the data, and the per-batch step."""

    def __init__(self, module, teacher, inputs, labels, dev, temperature, alpha, seed):
        self.module, self.teacher, self.inputs, self.dev = module, teacher, inputs, dev
        self.temperature, self.alpha = temperature, alpha
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels),
                                                                  dtype=torch.long)
        self.rng = np.random.default_rng(seed)
        self.adapters = None

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(training indices, held-out indices): a seeded `fraction` of the samples held out,
        none where that leaves fewer than one on either side."""
        n = len(next(iter(self.inputs.values())))
        order = np.random.default_rng(0).permutation(n)
        k = int(round(n * fraction))
        return (order, order[:0]) if k < 1 or k >= n else (order[k:], order[:k])

    def _loss(self, idx: np.ndarray) -> torch.Tensor:
        feeds = {k: v[idx] for k, v in self.inputs.items()}
        t_out, t_feats = self.teacher(feeds, self.adapters.names)
        s_out, s_feats = self.adapters.run(self.module, feeds, self.dev)
        labels = None if self.labels is None else self.labels[idx].to(self.dev)
        loss = _output_loss(s_out, t_out, self.temperature, self.alpha, labels)
        return loss + self.adapters.loss(s_feats, t_feats)

    def epoch(self, train: np.ndarray, batch_size: int, opt, sched, bar, freeze_bn) -> float:
        self.module.train()
        if freeze_bn:
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        total = 0.0
        for idx in np.array_split(self.rng.permutation(train), -(-len(train) // batch_size)):
            loss = self._loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
        self.module.eval()
        return total / len(train)

    def loss_on(self, held: np.ndarray, batch: int = 256) -> float:
        """The distillation loss on the held-out samples (0 where there are none)."""
        if not len(held):
            return 0.0
        self.module.eval()
        with torch.no_grad():
            return sum(self._loss(held[i:i + batch]).item() * len(held[i:i + batch])
                       for i in range(0, len(held), batch)) / len(held)


def distilled_params(model, teacher, data, **options) -> dict:
    """Frontend.distilled_params: a copy of `model` (a graphslim model) distilled towards
    `teacher`, and the parameters that changed, (node, role) -> array."""
    if hasattr(model, "to_proto"):  # ONNX: the lifted module is the copy
        from graphslim.frontends.onnx_lift import lift, trained_params

        return trained_params(model, distill(lift(model), teacher, data, **options))
    scratch = model.copy()
    distill(scratch, teacher, data, **options)
    return changed_params(model.view(), scratch.view())


def changed_params(before, after) -> dict:
    """(node, role) -> the parameter in `after` (a view of the trained copy) wherever it
    differs from `before` (the same graph, untrained)."""
    out = {}
    for node in before.nodes():
        for role in node.params:
            old, new = before.param(node.name, role), after.param(node.name, role)
            if old.shape == new.shape and not np.array_equal(old, new):
                out[(node.name, role)] = new
    return out


def _check(epochs, batch_size, lr, temperature, alpha, labels, n, validate) -> None:
    if epochs < 1 or batch_size < 1 or not lr > 0 or not temperature > 0:
        raise ValueError("epochs and batch_size must be >= 1, lr and temperature > 0")
    if not 0 <= validate < 1:
        raise ValueError(f"validate must be in [0, 1) (a fraction held out), not {validate}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (weight of the teacher's loss), not {alpha}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")


def _student_module(student):
    """(the nn.Module to train, a function giving the student back in its given form): a
    module, a graphslim fx model (graphslim.trace) or a run result holding one."""
    if isinstance(student, nn.Module):
        return student, lambda m: m
    model = getattr(student, "model", student)  # optimize()'s RunResult
    if hasattr(model, "to_proto"):  # an ONNX model: trained lifted, given back lowered
        from graphslim.frontends.onnx_lift import lift, lower

        def lowered(trained):
            out = lower(trained, model)
            if model is not student:
                student.model = out
                return student
            return out

        return lift(model), lowered
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"distill: the student must be a torch module or a graphslim model "
                        f"(graphslim.load / trace / optimize), not {type(model).__name__}")

    def back(_trained):
        model.weights_changed()  # its cached view read the old weights
        return student

    return module, back


def _inputs(data, module, student) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else
                np.asarray(v) for k, v in data.items()}
    model = getattr(student, "model", student)
    specs = model.input_specs() if hasattr(model, "input_specs") else None
    name = specs[0].name if specs else "x"
    return {name: np.asarray(data, np.float32)}


class _Teacher:
    """The teacher's outputs (and hint features) on a batch: a torch module run under no_grad,
    or a graphslim model run as it runs (ONNX Runtime for an ONNX file)."""

    def __init__(self, teacher, dev):
        teacher = getattr(teacher, "model", teacher)  # optimize()'s RunResult
        if isinstance(teacher, nn.Module) or isinstance(getattr(teacher, "module", None),
                                                        nn.Module):
            self.module = teacher if isinstance(teacher, nn.Module) else teacher.module
            self.module = copy.deepcopy(self.module).to(dev).eval()
            self.model = None
        else:
            self.module, self.model = None, teacher
        self.dev = dev

    def __call__(self, feeds: dict, hints: list[str]):
        if self.module is None:
            if hints:
                raise ValueError("hints need a torch teacher (an ONNX teacher gives outputs)")
            outs = self._run_model(feeds)
            return [torch.from_numpy(o).to(self.dev) for o in outs], {}
        feats: dict[str, torch.Tensor] = {}
        handles = [self.module.get_submodule(h).register_forward_hook(
            lambda _m, _i, out, h=h: feats.__setitem__(h, out)) for h in hints]
        try:
            with torch.no_grad():
                out = self.module(*[torch.from_numpy(v).to(self.dev) for v in feeds.values()])
        finally:
            for handle in handles:
                handle.remove()
        return _flatten(out), feats

    def _run_model(self, feeds: dict) -> list[np.ndarray]:
        names = [sp.name for sp in self.model.input_specs()]  # the student's order, its names
        feeds = dict(zip(names, feeds.values()))
        first = next(iter(feeds.values()))
        outputs = list(self.model.view().outputs)
        try:  # the whole batch in one run, the batch dimension freed where the ops allow
            got = self.model.capture(feeds, outputs, optimized=True)
            return [got[o] for o in outputs]
        except Exception:  # a file with a fixed batch of 1: one sample per run
            rows = [list(self.model.run({k: v[i:i + 1] for k, v in feeds.items()}).values())
                    for i in range(len(first))]
            return [np.concatenate(col) for col in zip(*rows)]


class _Adapters(nn.Module):
    """Adaptation layers from the student's hint features to the teacher's, and the hooks that
    catch the student's features."""

    def __init__(self, student: nn.Module, teacher: _Teacher, hints, inputs, dev):
        super().__init__()
        self.names = list(hints)
        self.layers = nn.ModuleDict()
        self._feats: dict[str, torch.Tensor] = {}
        self._handles = []
        if not self.names:
            return
        for h in self.names:
            for who, m in (("student", student), ("teacher", teacher.module)):
                try:
                    if m is not None:
                        m.get_submodule(h)
                except AttributeError as exc:
                    raise ValueError(f"hint '{h}': no such submodule in the {who}") from exc
        probe = {k: v[:2] for k, v in inputs.items()}
        _, t_feats = teacher(probe, self.names)
        for h in self.names:
            sub = student.get_submodule(h)
            self._handles.append(sub.register_forward_hook(
                lambda _m, _i, out, h=h: self._feats.__setitem__(h, out)))
        with torch.no_grad():
            student.eval()
            student(*[torch.from_numpy(v).to(dev) for v in probe.values()])
        for h in self.names:
            s, t = self._feats[h], t_feats[h]
            self.layers[h.replace(".", "_")] = _adapter(s, t).to(dev)
        self._feats.clear()

    def run(self, module, feeds, dev):
        self._feats.clear()
        out = module(*[torch.from_numpy(v).to(dev) for v in feeds.values()])
        return _flatten(out), dict(self._feats)

    def loss(self, s_feats: dict, t_feats: dict) -> torch.Tensor:
        total = torch.zeros(())
        for h in self.names:
            adapted = self.layers[h.replace(".", "_")](s_feats[h])
            total = total + _relative_mse(adapted, t_feats[h])
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _adapter(s: torch.Tensor, t: torch.Tensor) -> nn.Module:
    if s.shape[2:] != t.shape[2:] or s.shape[0] != t.shape[0]:
        raise ValueError(f"hint: student feature {list(s.shape)} and teacher feature "
                         f"{list(t.shape)} differ beyond the channel axis")
    conv = s.ndim == 4
    layer = nn.Conv2d(s.shape[1], t.shape[1], 1) if conv else nn.Linear(s.shape[-1],
                                                                         t.shape[-1])
    if s.shape[1 if conv else -1] == t.shape[1 if conv else -1]:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(t.shape[1 if conv else -1]).reshape(layer.weight.shape))
            layer.bias.zero_()
    return layer


def _output_loss(s_out: list, t_out: list, temperature: float, alpha: float, labels
                 ) -> torch.Tensor:
    if len(s_out) != len(t_out):
        raise ValueError(f"student has {len(s_out)} outputs, teacher {len(t_out)}")
    total = torch.zeros((), device=s_out[0].device)
    for i, (s, t) in enumerate(zip(s_out, t_out)):
        if s.shape != t.shape:
            raise ValueError(f"output {i}: student {list(s.shape)}, teacher {list(t.shape)}")
        if s.ndim == 2 and s.shape[1] > 1 and not _unit_rows(t):  # class scores
            if _probabilities(t):  # a file ending in Softmax: its log is the logits (+ c)
                s, t = s.clamp_min(1e-12).log(), t.clamp_min(1e-12).log()
            kd = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, 1),
                                      nn.functional.log_softmax(t / temperature, 1),
                                      log_target=True, reduction="batchmean")
            loss = temperature ** 2 * kd
            if labels is not None and i == 0:
                loss = alpha * loss + (1 - alpha) * nn.functional.cross_entropy(s, labels)
            total = total + loss
        else:
            total = total + _relative_mse(s, t)
    return total


def _probabilities(t: torch.Tensor) -> bool:
    return bool((t >= 0).all()) and bool(torch.allclose(t.sum(1), torch.ones_like(t[:, 0]),
                                                        atol=1e-3))


def _unit_rows(t: torch.Tensor) -> bool:
    """Rows of L2 norm 1: a normalised embedding (relative MSE on it is ~2 x (1 - cosine))."""
    return bool(torch.allclose(t.norm(dim=1), torch.ones_like(t[:, 0]), atol=1e-3))


def _relative_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((s - t) ** 2).mean() / t.var().clamp_min(1e-12)


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [v for o in out.values() for v in _flatten(o)]
    return [v for o in out for v in _flatten(o)]


def _progress(steps: int, enabled: bool | None):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the torch extra; without it, no bar
        from types import SimpleNamespace

        return SimpleNamespace(update=lambda _: None, close=lambda: None)
    return tqdm(total=steps, desc="distill", disable=None if enabled is None else not enabled,
                leave=False)
