"""Training several members of the ensemble in one pass over shared slices (`classifier.ensemble: batched`).

Each slice of sampled pixel features is built once and feeds every member still training. The members' state
is stacked along a leading member dimension M (one Adam pass, one BatchNorm op, one gather for all); the
layers are exactly `pipeline.classifier.build_classifier`'s (Linear, ReLU, optional Dropout, BatchNorm1d in
train mode with its running statistics). Per member, as in `pipeline.classifier.train_member`:

- init: ``torch.manual_seed(member seed)`` then ``build_classifier`` (the same initial weights as the member
  trained alone);
- its own order of each slice's pixels (``slice_order``: seeded by member seed, epoch and slice number), cut into
  batches; what does not fill a batch at the end of a slice is carried into the next slice's first batch;
- its own dropout masks (a ``torch.Generator`` per member, seeded by its seed);
- its own early-stopping state (`EarlyStopping`): a member that stops is taken out of the stack (no further
  update, no further cost) and handed to ``on_member_done``; the pass ends when every member has stopped or after
  max_epochs;
- Adam / AdamW from ``torch.optim`` (``fused=True``: one pass over each stacked tensor) over the stacked tensors:
  the update is elementwise, so each member's values follow the same formulas as alone.

The step's backward pass is written out (`stacked_step`), not taken from autograd: the gradients land in buffers
allocated once per stack (no 43 MB allocation and page faults per step at D = 8448 and 10 members), the first
layer's input gradient is never formed, and the batch is gathered from the slice into a buffer of its own.

The matrix products: on CUDA batched products over the members (``torch.baddbmm`` / ``bmm``); on the CPU one
call per member, and the large ones (a layer with at least `ONEDNN_MIN_WEIGHTS` weights: the first layer at
D = 8448) through oneDNN (``torch.ops.mkldnn._linear_pointwise``, float32 in and out). torch's float32 products
run through MKL, which takes its AVX2 kernels on non-Intel CPUs (~140-165 GFLOP/s for this shape on this
project's 2-core AMD machine), where oneDNN takes AVX-512 (~260-370 GFLOP/s). The same float32 formulas, the sums
ordered differently (float rounding). DDPMSEG_ONEDNN=0 turns oneDNN off (per-member torch products).

A member's result depends on its seed and the shared slices only, not on the other members of the pass (on the
CPU every product is the member's own call: bit for bit, tested; MKL's batched products round a batch of one
differently from a batch of three), so growing an ensemble trains the new members alone.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import classifier as clf
from pipeline.threads import one_thread_here

__all__ = ["ENSEMBLE_MODES", "StackedMembers", "stack_members", "unstack_member", "stacked_forward",
           "stacked_step", "slice_order", "train_members", "training_step_flops"]

ENSEMBLE_MODES = ("batched", "independent")
ONEDNN_MIN_WEIGHTS = 65536  # a Linear layer with at least this many weights: its products per member via oneDNN
BATCHNORM_MOMENTUM = 0.1  # nn.BatchNorm1d's default, as in the official classifier
BATCHNORM_EPS = 1e-5


@dataclass
class StackedMembers:
    """The state of M members of one architecture, stacked: ``state[name]`` is ``(M, *shape)`` for every entry of
    the template's state_dict (Linear weights in nn.Linear's layout, ``(M, out, in)``: each member's slab is the
    weight oneDNN's linear takes). Parameters are leaf tensors that require grad; BatchNorm buffers do not."""

    template: nn.Sequential  # the architecture (its own values unused)
    state: dict[str, Tensor]
    dropout: float

    @property
    def size(self) -> int:
        return int(next(iter(self.state.values())).shape[0])

    def parameters(self) -> list[Tensor]:
        return [self.state[name] for name, _ in self.template.named_parameters()]


@functools.cache
def _onednn_linear() -> Callable[..., Tensor] | None:
    """torch's oneDNN linear (x @ weight.T + bias, float32) where this torch has it and it agrees with torch's
    products in both forms the step uses (a plain weight with a bias; a transposed view as the weight, no bias);
    None where not, or where DDPMSEG_ONEDNN=0."""
    if os.environ.get("DDPMSEG_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((8, 16), (4, 16), (4,)))
        grad = torch.randn(8, 4, generator=generator)
        forward_ok = torch.allclose(op(x, weight, bias, "none", [], ""), torch.addmm(bias, x, weight.T), atol=1e-5)
        gradient_ok = torch.allclose(op(grad.T.contiguous(), x.T, None, "none", [], ""), grad.T @ x, atol=1e-5)
        return op if forward_ok and gradient_ok else None
    except (AttributeError, RuntimeError):
        return None


def _onednn_for(weight: Tensor) -> Callable[..., Tensor] | None:
    """The oneDNN linear where the products of `weight` (M, out, in) should go through it, else None."""
    if weight.dtype != torch.float32 or weight.shape[1] * weight.shape[2] < ONEDNN_MIN_WEIGHTS:
        return None
    return _onednn_linear()


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Every member's Linear: x (M, B, in), weight (M, out, in), bias (M, out) -> (M, B, out)."""
    if x.device.type != "cpu":
        return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
    onednn = _onednn_for(weight)
    if onednn is None:
        return torch.stack([torch.addmm(bias[m], x[m], weight[m].T) for m in range(len(x))])
    return torch.stack([onednn(x[m], weight[m], bias[m], "none", [], "") for m in range(len(x))])


def _weight_gradient(grad: Tensor, inputs: Tensor, out: Tensor) -> None:
    """out (M, out, in) = grad (M, B, out)^T @ inputs (M, B, in): each member's weight gradient."""
    if out.device.type != "cpu":
        torch.bmm(grad.transpose(1, 2), inputs, out=out)
        return
    onednn = _onednn_for(out)
    for m in range(len(out)):
        if onednn is None:
            torch.mm(grad[m].T, inputs[m], out=out[m])
        else:  # grad^T @ inputs as a linear whose "weight" is inputs^T (in, B)
            out[m].copy_(onednn(grad[m].T.contiguous(), inputs[m].T, None, "none", [], ""))


def _input_gradient(grad: Tensor, weight: Tensor) -> Tensor:
    """grad (M, B, out) @ weight (M, out, in) -> (M, B, in): the gradient for the layer's input."""
    if grad.device.type != "cpu":
        return torch.bmm(grad, weight)
    return torch.stack([grad[m] @ weight[m] for m in range(len(grad))])


def stack_members(models: Sequence[nn.Sequential], device: str | torch.device = "cpu") -> StackedMembers:
    """Stack the state of `models` (same architecture, from build_classifier) on `device`."""
    if not models:
        raise ValueError("stack_members: no members given")
    names = {name for name, _ in models[0].named_parameters()}
    state = {}
    for name in models[0].state_dict():
        values = [m.state_dict()[name].detach() for m in models]
        stacked = torch.stack(values).contiguous().to(device)
        state[name] = stacked.requires_grad_() if name in names else stacked
    dropout = next((layer.p for layer in models[0] if isinstance(layer, nn.Dropout)), 0.0)
    return StackedMembers(models[0], state, float(dropout))


def unstack_member(stacked: StackedMembers, member: int, number_class: int, dim: int) -> nn.Sequential:
    """Member `member` of the stack as its own classifier (CPU, eval mode), built without drawing from torch's
    global RNG (on the meta device: no init work, then its storage allocated on the CPU and filled)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = clf.build_classifier(number_class, dim, stacked.dropout)
    model = model.to_empty(device="cpu")
    model.load_state_dict({name: value[member].detach().cpu() for name, value in stacked.state.items()})
    return model.eval()


def _keep(stacked: StackedMembers, keep: Tensor) -> StackedMembers:
    names = {name for name, _ in stacked.template.named_parameters()}
    state = {}
    for name, value in stacked.state.items():
        kept = value.detach()[keep].clone()
        state[name] = kept.requires_grad_() if name in names else kept
    return StackedMembers(stacked.template, state, stacked.dropout)


def stacked_forward(stacked: StackedMembers, x: Tensor, dropout_masks: Sequence[Tensor] = ()) -> Tensor:
    """Train-mode forward of every member: x (M, B, D) float32 -> logits (M, B, C).

    BatchNorm1d uses each member's batch statistics and updates its running mean / variance (unbiased) in place,
    as nn.BatchNorm1d does in train mode. dropout_masks: one (M, B, width) tensor per Dropout layer, in order,
    already scaled by 1 / (1 - p)."""
    masks = iter(dropout_masks)
    state = stacked.state
    for index, layer in enumerate(stacked.template):
        if isinstance(layer, nn.Linear):
            weight, bias = state[f"{index}.weight"], state[f"{index}.bias"]  # weight: (M, out, in)
            x = torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
        elif isinstance(layer, nn.ReLU):
            x = torch.relu(x)
        elif isinstance(layer, nn.Dropout):
            x = x * next(masks)
        elif isinstance(layer, nn.BatchNorm1d):
            count = x.shape[1]
            var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
            with torch.no_grad():
                running_mean, running_var = state[f"{index}.running_mean"], state[f"{index}.running_var"]
                running_mean.mul_(1 - BATCHNORM_MOMENTUM).add_(mean[:, 0], alpha=BATCHNORM_MOMENTUM)
                running_var.mul_(1 - BATCHNORM_MOMENTUM).add_(var[:, 0] * (count / (count - 1)),
                                                              alpha=BATCHNORM_MOMENTUM)
                state[f"{index}.num_batches_tracked"].add_(1)
            x = (x - mean) * torch.rsqrt(var + BATCHNORM_EPS)
            x = torch.addcmul(state[f"{index}.bias"][:, None, :], x, state[f"{index}.weight"][:, None, :])
        else:
            raise TypeError(f"stacked_forward: unsupported layer {type(layer).__name__} at index {index}")
    return x


def gradient_buffers(stacked: StackedMembers) -> dict[str, Tensor]:
    """One buffer per parameter of `stacked` (its shape, dtype and device) for stacked_step to write into."""
    return {name: torch.empty_like(stacked.state[name], requires_grad=False)
            for name, _ in stacked.template.named_parameters()}


@torch.no_grad()
def stacked_step(stacked: StackedMembers, x: Tensor, y: Tensor, grads: dict[str, Tensor],
                 dropout_masks: Sequence[Tensor] = ()) -> Tensor:
    """Forward and backward of every member on its batch, without autograd: x (M, B, D) float32, y (M, B) int64.

    Returns each member's mean cross-entropy (M,); writes d(sum of the members' losses)/d(parameter) into
    grads[name] (gradient_buffers: every element overwritten), and updates BatchNorm's running statistics as
    stacked_forward does. The same formulas as autograd through stacked_forward (to float rounding: tested); the
    first layer's input gradient is not computed (the features need none)."""
    masks = iter(dropout_masks)
    state = stacked.state
    saved: list[tuple[Tensor, ...]] = []  # per layer, what its backward reads
    for index, layer in enumerate(stacked.template):
        if isinstance(layer, nn.Linear):
            saved.append((x,))
            x = _linear(x, state[f"{index}.weight"], state[f"{index}.bias"])
        elif isinstance(layer, nn.ReLU):
            x = torch.relu_(x)  # in place on the Linear's output, which no backward reads
            saved.append((x,))
        elif isinstance(layer, nn.Dropout):
            mask = next(masks)
            saved.append((mask,))
            x = x * mask
        elif isinstance(layer, nn.BatchNorm1d):
            count = x.shape[1]
            var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
            running_mean, running_var = state[f"{index}.running_mean"], state[f"{index}.running_var"]
            running_mean.mul_(1 - BATCHNORM_MOMENTUM).add_(mean[:, 0], alpha=BATCHNORM_MOMENTUM)
            running_var.mul_(1 - BATCHNORM_MOMENTUM).add_(var[:, 0] * (count / (count - 1)), alpha=BATCHNORM_MOMENTUM)
            state[f"{index}.num_batches_tracked"].add_(1)
            rstd = torch.rsqrt(var + BATCHNORM_EPS)
            normalised = (x - mean) * rstd
            saved.append((normalised, rstd))
            x = torch.addcmul(state[f"{index}.bias"][:, None, :], normalised, state[f"{index}.weight"][:, None, :])
        else:
            raise TypeError(f"stacked_step: unsupported layer {type(layer).__name__} at index {index}")
    batch = x.shape[1]
    log_probs = torch.log_softmax(x, dim=-1)  # (M, B, C)
    losses = -log_probs.gather(-1, y[..., None])[..., 0].mean(1)
    grad = log_probs.exp_()  # d(mean CE)/d(logits) = (softmax - one hot) / B
    grad.scatter_add_(-1, y[..., None], torch.full_like(y[..., None], -1, dtype=grad.dtype)).div_(batch)
    for index in range(len(stacked.template) - 1, -1, -1):
        layer, context = stacked.template[index], saved[index]
        if isinstance(layer, nn.Linear):
            (inputs,) = context
            weight = state[f"{index}.weight"]
            _weight_gradient(grad, inputs, grads[f"{index}.weight"])
            torch.sum(grad, dim=1, out=grads[f"{index}.bias"])
            if index > 0:
                grad = _input_gradient(grad, weight.detach())
        elif isinstance(layer, nn.ReLU):
            (outputs,) = context
            grad = grad.masked_fill_(outputs <= 0, 0.0)
        elif isinstance(layer, nn.Dropout):
            (mask,) = context
            grad = grad * mask
        elif isinstance(layer, nn.BatchNorm1d):
            normalised, rstd = context
            torch.sum(grad * normalised, dim=1, out=grads[f"{index}.weight"])
            torch.sum(grad, dim=1, out=grads[f"{index}.bias"])
            grad = grad * state[f"{index}.weight"].detach()[:, None, :]
            grad = (grad - grad.mean(1, keepdim=True)
                    - normalised * (grad * normalised).mean(1, keepdim=True)) * rstd
    return losses


def slice_order(seed: int, epoch: int, slice_number: int, n: int) -> Tensor:
    """(n,) int64: a member's order of the n pixels of a slice, seeded by (seed, epoch, slice_number)."""
    return torch.from_numpy(np.random.default_rng([seed, epoch, slice_number]).permutation(n))


def training_step_flops(number_class: int, dim: int, batch_size: int) -> float:
    """Multiply-add FLOPs of one member's training step (forward + backward of the three Linear layers; the input
    gradient of the first layer is not computed): 2 * B * (3 * (h1 h2 + h2 C) + 2 * D h1)."""
    first, second = clf.hidden_widths(number_class)
    return 2.0 * batch_size * (2 * dim * first + 3 * (first * second + second * number_class))


def _optimizer(params: list[Tensor], settings: clf.TrainSettings) -> torch.optim.Optimizer:
    """Adam / AdamW with fused=True: one kernel pass per tensor (the default single-tensor path makes ~10 passes
    over the stacked first-layer weights, 43 MB each at D = 8448 and 10 members, the largest cost of a step)."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; expected one of {clf.OPTIMIZERS}")


def _compact_optimizer(old: torch.optim.Optimizer, old_params: list[Tensor], new_params: list[Tensor],
                       keep: Tensor, settings: clf.TrainSettings) -> torch.optim.Optimizer:
    """A new optimizer over new_params whose state is old's rows `keep` (Adam's moments; the step count)."""
    new = _optimizer(new_params, settings)
    for old_param, new_param in zip(old_params, new_params):
        state = old.state.get(old_param)
        if state:
            new.state[new_param] = {key: (value if key == "step" else value[keep].clone())
                                    for key, value in state.items()}
    return new


def train_members(
    settings: clf.TrainSettings,
    seeds: Sequence[int],
    epoch_slices: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    *,
    device: str | torch.device = "cpu",
    iterations_per_epoch: int | None = None,
    on_member_done: Callable[[int, nn.Module, dict], None] | None = None,
    progress: bool = False,
    desc: str = "",
) -> list[tuple[nn.Module, dict]]:
    """Train one member per seed in one pass; returns [(model in eval mode on the CPU, info)] in seeds' order.

    epoch_slices(epoch) yields the epoch's slices (features (n, D) float, labels (n,) int64), the same for every
    member; a slice's features need to stay valid only until the slice after the next one is requested.
    iterations_per_epoch: at most that many batches per epoch (None: every full batch). on_member_done(position,
    model, info) is called as soon as a member stops (early stop or the end), so it can be written at once.
    info is pipeline.classifier.train_member's: epochs, iterations, final_loss, best_loss, stopped_early.
    """
    if not seeds:
        raise ValueError("train_members: no seeds given")
    device = torch.device(device)
    # the first slice is read and built in a thread while the members are initialised (0.2 s at D = 8448 and 10
    # members: their init draws and the stacking); the generator is resumed from one thread at a time
    first_epoch = iter(epoch_slices(0))
    starter = ThreadPoolExecutor(1, "first-slice", initializer=one_thread_here)
    try:
        first_slice = starter.submit(next, first_epoch, None)
        models = []
        for seed in seeds:
            torch.manual_seed(seed)  # the init of the member trained alone
            models.append(clf.build_classifier(settings.number_class, settings.dim, settings.dropout))
        stacked = stack_members(models, device)
        head = first_slice.result()
    finally:
        starter.shutdown(wait=True)
    del models
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    dropout_widths = [stacked.template[i + 1].num_features for i, layer in enumerate(stacked.template)
                      if isinstance(layer, nn.Dropout)]
    params = stacked.parameters()
    optimizer = _optimizer(params, settings)
    batch = settings.batch_size
    active = list(range(len(seeds)))  # positions (into seeds) of the members still in the stack
    stoppers = [clf.EarlyStopping(start_epoch=settings.early_stop_start_epoch, patience=settings.patience)
                for _ in seeds]
    final_loss = [math.nan] * len(seeds)
    iterations = 0
    results: list[tuple[nn.Module, dict] | None] = [None] * len(seeds)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc or f"train {len(seeds)} members", unit="it", leave=False)

    def finish(positions: list[int], epoch: int, stopped_early: bool) -> None:
        for position in positions:
            row = active.index(position)
            model = unstack_member(stacked, row, settings.number_class, settings.dim)
            stopper = stoppers[position]
            info = {"epochs": epoch + 1, "iterations": iterations, "final_loss": final_loss[position],
                    "best_loss": stopper.best if stopper.active else None, "stopped_early": stopped_early}
            results[position] = (model, info)
            if on_member_done is not None:
                on_member_done(position, model, info)

    def attach_gradients() -> tuple[dict[str, Tensor], Tensor]:
        """The stack's gradient buffers (as its parameters' .grad, read by the optimizer) and batch buffer."""
        grads = gradient_buffers(stacked)
        for name, param in zip((name for name, _ in stacked.template.named_parameters()), stacked.parameters()):
            param.grad = grads[name]
        return grads, torch.empty((stacked.size, batch, settings.dim), dtype=torch.float32, device=device)

    grads, batch_buffer = attach_gradients()

    def step(x: Tensor, y: Tensor, epoch: int) -> list[int]:
        """One batch for every active member: x (A, B, D), y (A, B); returns the positions that stop."""
        nonlocal iterations
        masks = []
        if stacked.dropout > 0:
            keep_p = 1.0 - stacked.dropout
            for width in dropout_widths:
                masks.append(torch.stack([torch.empty((batch, width), device=device).bernoulli_(
                    keep_p, generator=generators[p]) for p in active]).div_(keep_p))
        losses = stacked_step(stacked, x, y, grads, masks)
        optimizer.step()
        iterations += 1
        stopping = []
        for position, loss in zip(active, losses.tolist()):
            final_loss[position] = loss
            if stoppers[position].update(epoch, loss):
                stopping.append(position)
        if bar is not None:
            bar.update(1)
        return stopping

    try:
        for epoch in range(settings.max_epochs):
            batches_this_epoch = 0
            carry_x: Tensor | None = None  # (A, r, D): each member's pixels of the last slice not yet batched
            carry_y: Tensor | None = None
            slices = first_epoch if epoch == 0 else epoch_slices(epoch)
            started = itertools.chain([] if head is None else [head], slices) if epoch == 0 else slices
            head = None
            for slice_number, (features, labels) in enumerate(started):
                if features.ndim != 2 or features.shape[1] != settings.dim or labels.shape != (features.shape[0],):
                    raise ValueError(f"epoch {epoch} slice {slice_number}: expected features (n, {settings.dim}) "
                                     f"and labels (n,), got {tuple(features.shape)} and {tuple(labels.shape)}")
                features = features.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
                labels = labels.to(device=device, dtype=torch.long, non_blocking=True)
                n = labels.shape[0]
                order = torch.stack([slice_order(seeds[p], epoch, slice_number, n) for p in active]).to(device)
                position = 0
                while position < n and active:
                    if iterations_per_epoch is not None and batches_this_epoch >= iterations_per_epoch:
                        break
                    have = 0 if carry_y is None else carry_y.shape[1]
                    take = min(batch - have, n - position)
                    rows = order[:, position:position + take]  # (A, take)
                    if take == batch:  # a whole batch from this slice: gathered into the stack's batch buffer
                        x = torch.index_select(features, 0, rows.reshape(-1),
                                               out=batch_buffer.view(-1, settings.dim)).view(batch_buffer.shape)
                    else:
                        x = features[rows.reshape(-1)].view(len(active), take, settings.dim)
                    y = labels[rows]
                    position += take
                    if have:
                        x, y = torch.cat([carry_x, x], 1), torch.cat([carry_y, y], 1)
                        carry_x = carry_y = None
                    if x.shape[1] < batch:  # the slice's last pixels: carried into the next slice
                        carry_x, carry_y = x.clone(), y.clone()
                        break
                    stopping = step(x, y, epoch)
                    batches_this_epoch += 1
                    if stopping:
                        finish(stopping, epoch, stopped_early=True)
                        keep_rows = [row for row, p in enumerate(active) if p not in stopping]
                        active[:] = [p for p in active if p not in stopping]
                        if active:
                            keep = torch.tensor(keep_rows, dtype=torch.long, device=device)
                            old_params = params
                            stacked = _keep(stacked, keep)
                            params = stacked.parameters()
                            optimizer = _compact_optimizer(optimizer, old_params, params, keep, settings)
                            grads, batch_buffer = attach_gradients()
                            order = order[keep]
                if not active or (iterations_per_epoch is not None and batches_this_epoch >= iterations_per_epoch):
                    break
            if hasattr(slices, "close"):
                slices.close()  # an epoch cut short: stop its prefetching now
            if batches_this_epoch == 0 and active:
                raise ValueError(f"epoch_slices({epoch}) gave no full batch: no labelled pixels to train on?")
            if not active:
                break
        else:
            finish(list(active), settings.max_epochs - 1, stopped_early=False)
    finally:
        if bar is not None:
            bar.close()
    return [result for result in results if result is not None]
