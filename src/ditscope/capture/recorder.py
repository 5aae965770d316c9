"""Record K, V and the attention output of every attention layer at every step, for any DiT.

One mechanism serves every model:

1. forward pre/post hooks on each attention module say which layer is running and what it was given
   (`hidden_states` and `encoder_hidden_states` lengths, to tell image tokens from text tokens);
2. while recording, `torch.nn.functional.scaled_dot_product_attention` is wrapped; when a layer is
   running the wrapper sees q, k, v (B, H, S, D) after projection, QK-norm and RoPE, and the output
   A before the output projection. Outside a layer, and after the recorder exits, it is untouched.

Each call is reduced on the device to a few float32 sums per batch entry and token stream
(`stats.distances.reduce_sums`); the previous step's tensors are kept in `storage_dtype`, optionally
on the CPU. At the end of a step all sums go to the host in one transfer (one sync per step).

Steps are delimited by `end_step()`: the pipeline runner calls it from the scheduler's `step`, and in
`step_on="forward"` mode (a user's own sampling loop) every forward of the model is one step.
Classifier-free guidance branches are never mixed: a batched pass is split by `batched_branches`,
separate passes in one step take `separate_branches` in call order.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DitscopeError
from ..families import IMAGE, TEXT, Family, family_of
from ..patching import Patches, read_timestep, timestep_argument
from ..stats.distances import N_SUMS, metrics_from_sums, reduce_sums

TARGETS = ("q", "k", "v", "a", "out")  # "a": attention output before out-proj; "out": the module's output
DEFAULT_TARGETS = ("k", "v", "a")

Key = tuple[int, str, str, str]  # (layer index, target, stream, branch)


@dataclass
class Sample:
    """Per-prompt distances of one finished sample (a batch of prompts run together)."""

    values: dict[Key, np.ndarray]  # key -> (prompts, steps - 1, metrics)
    timesteps: list[float]
    n_prompts: int


@dataclass
class _Layer:
    index: int
    name: str
    module: torch.nn.Module
    single_stream: bool
    # filled by the pre-hook for the current call
    hidden_len: int = 0
    text_len: int | None = None
    calls: list = field(default_factory=list)  # per SDPA call: {target: (sums, numel, streams)}
    output_only: bool = False  # recorded by its output (an MLP) or residual (a block), not through SDPA
    inputs: tuple = ()  # output-only layers: this call's hidden_states and encoder_hidden_states


def find_attention_modules(model: torch.nn.Module, attention=None, family: Family | None = None):
    """The attention modules to record, as (qualified name, module) in registration order.

    `attention=None` takes every module with a `.processor` (diffusers' attention modules); otherwise a
    class name, or a glob / regex on qualified module names, or a list of those.
    """
    family = family or family_of(model)
    if attention is None:
        found = [(n, m) for n, m in model.named_modules() if hasattr(m, "processor") and n]
    else:
        patterns = [attention] if isinstance(attention, str) else list(attention)

        def matches(name, module):
            for p in patterns:
                if type(module).__name__ == p or fnmatch.fnmatchcase(name, p):
                    return True
                try:
                    if re.fullmatch(p, name):
                        return True
                except re.error:
                    pass
            return False

        found = [(n, m) for n, m in model.named_modules() if n and matches(n, m)]
    found = [(n, m) for n, m in found if not family.excludes(n)]
    if not found:
        what = (
            "modules with a .processor attribute" if attention is None else f"modules matching {attention!r}"
        )
        raise DitscopeError(
            f"no attention layer found in {type(model).__name__} (looked for {what}); "
            "name the attention modules with attention='ClassName' or a module-name pattern"
        )
    return found


class Recorder:
    """Context manager that records step-to-step distances of attention tensors.

    Args:
        model: the transformer (a diffusers model or any nn.Module whose attention calls SDPA).
        attention: which modules are attention layers (see `find_attention_modules`).
        targets: subset of ("q", "k", "v", "a", "out").
        storage_dtype: dtype of the previous step's kept tensors (default: the captured dtype).
        offload: keep the previous step's tensors on the CPU.
        step_on: "forward" (each top-level forward is a step) or "external" (call `end_step()`).
        batched_branches: branch names of the equal batch chunks of one forward, in order.
        separate_branches: branch names of successive forwards within one step (external mode).
        on_step: called with the number of finished steps of the current sample after each step.
        outputs: modules recorded by what they write (target "out"), with no SDPA needed: an MLP by its
            output, a block (a module returning a tensor shaped like its `hidden_states`) by its residual,
            output minus input. Same forms as `attention`; `output_sites(model, "mlp,blocks")` names them
            from the family table.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        attention=None,
        targets: Iterable[str] = DEFAULT_TARGETS,
        storage_dtype: torch.dtype | None = None,
        offload: bool = False,
        step_on: str = "forward",
        batched_branches: tuple[str, ...] = ("cond",),
        separate_branches: tuple[str, ...] = ("cond", "uncond"),
        on_step: Callable[[int], None] | None = None,
        outputs=None,
    ):
        targets = tuple(targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise DitscopeError(f"unknown target(s) {unknown or targets}; choose from {', '.join(TARGETS)}")
        if step_on not in ("forward", "external"):
            raise DitscopeError(f"step_on must be 'forward' or 'external', not {step_on!r}")
        self.model = model
        self.family = family_of(model)
        self.targets = targets
        self.storage_dtype = storage_dtype
        self.offload = offload
        self.step_on = step_on
        self.batched_branches = tuple(batched_branches)
        self.separate_branches = tuple(separate_branches)
        self.on_step = on_step
        self.prompts_per_sample: int | None = None  # set by the runner; inferred from the batch otherwise
        # where a positional timestep sits: diffusers' `timestep` parameter, else the (x, t, ...) convention
        found = timestep_argument(model.forward)
        self._timestep_position = found if found is not None else 1
        modules = find_attention_modules(model, attention, self.family)
        self._layers = [_Layer(-1, n, m, self.family.is_single_stream(n)) for n, m in modules]
        if outputs:
            taken = {n for n, _ in modules}
            try:
                extra = find_attention_modules(model, outputs, self.family)
            except DitscopeError:
                raise DitscopeError(
                    f"no module matches outputs={outputs!r} in {type(model).__name__}"
                ) from None
            self._layers += [_Layer(-1, n, m, False, output_only=True) for n, m in extra if n not in taken]
        self.layer_names: list[str] = []  # in first-execution order; index = layer index
        self._handles: list = []
        self._active: _Layer | None = None
        self._orig_sdpa = None
        self._samples: list[Sample] = []
        self._scratch: dict = {}  # reusable float32 work buffers of reduce_sums, by shape
        self._group, self._ulysses = _sequence_split(model)
        self._reset_sample()

    # ----------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Recorder:
        for layer in self._layers:
            self._handles.append(
                layer.module.register_forward_pre_hook(self._layer_pre(layer), with_kwargs=True)
            )
            self._handles.append(layer.module.register_forward_hook(self._layer_post(layer)))
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post))
        self._patches = Patches()  # restores in order, and refuses if someone wrapped SDPA after us
        self._orig_sdpa = self._patches.set(F, "scaled_dot_product_attention", self._sdpa)
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._orig_sdpa is not None:
            self._patches.restore()
            self._orig_sdpa = None
        self._active = None
        self._scratch.clear()

    def number_layers(self, names: list[str]) -> None:
        """Use a known layer order (a resumed run's) instead of first-execution order."""
        by_name = {layer.name: layer for layer in self._layers}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DitscopeError(f"the saved profile has layers this model lacks: {', '.join(missing[:3])}")
        self.layer_names[:] = list(names)
        for i, name in enumerate(names):
            by_name[name].index = i

    # ----------------------------------------------------------------------------- sample control
    def _reset_sample(self):
        self._prev: dict = {}  # (layer, branches, call, target) -> kept tensor of the previous step
        self._host_prev: dict[Key, tuple[np.ndarray, np.ndarray]] = {}  # key -> (sum|X|, sum X^2)
        self._pending: list = []  # this step's rows: (key, slots, numel, device sums (4, n))
        self._steps: list[dict[Key, np.ndarray]] = []  # per finished step: key -> (prompts, 3)
        self._timesteps: list = []
        self._calls_this_step = 0
        self._step_timestep = None
        self._text_len: int | None = None
        self._branch_of_call = None

    def next_sample(self) -> Sample:
        """Close the current sample: its steps become per-prompt values. Returns the sample."""
        if self._pending:
            self.end_step()
        if not self._steps:
            raise DitscopeError(
                "no step was recorded for this sample; did the model run inside the recorder?"
            )
        if len(self._steps) < 2:
            raise DitscopeError("a sample needs at least 2 steps to measure a step-to-step distance")
        keys = list(self._steps[1].keys())
        values = {}
        for key in keys:
            try:
                values[key] = np.stack([step[key] for step in self._steps[1:]], axis=1).astype(np.float32)
            except KeyError:
                raise DitscopeError(f"layer {self.layer_names[key[0]]} did not run at every step") from None
        timesteps = [
            float(torch.as_tensor(t).flatten()[0]) if t is not None else float(i)
            for i, t in enumerate(self._timesteps)
        ]
        n_prompts = next(iter(values.values())).shape[0]
        sample = Sample(values, timesteps, n_prompts)
        self._samples.append(sample)
        self._reset_sample()
        return sample

    @property
    def samples(self) -> list[Sample]:
        return self._samples

    def profile(self, **meta):
        """All finished samples as a `Profile` (the current sample is closed first if it has steps)."""
        from ..artifact import Profile

        if self._steps or self._pending:
            self.next_sample()
        if not self._samples:
            raise DitscopeError("nothing was recorded: run the model inside `with ditscope.record(...)`")
        prof = None
        index = 0
        for s in self._samples:
            part = Profile.from_sample(s, self.layer_names, np.arange(index, index + s.n_prompts), meta)
            prof = part if prof is None else prof.merge(part)
            index += s.n_prompts
        return prof

    # -------------------------------------------------------------------------------- model hooks
    def _model_pre(self, module, args, kwargs):
        self._active = None  # a previous forward may have raised inside a layer
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states")
        self._text_len = enc.shape[1] if isinstance(enc, torch.Tensor) and enc.dim() >= 2 else None
        if self._step_timestep is None:
            self._step_timestep = read_timestep(args, kwargs, self._timestep_position)
            if isinstance(self._step_timestep, torch.Tensor):
                self._step_timestep = self._step_timestep.detach().flatten()[:1].clone()  # read at sample end
        self._branch_of_call = self._branches_for(
            hidden.shape[0] if isinstance(hidden, torch.Tensor) else None
        )
        self._calls_this_step += 1

    def _model_post(self, module, args, output):
        if self.step_on == "forward":
            self.end_step()

    def _branches_for(self, batch: int | None):
        """(branch names, prompts per branch) for the forward that is starting."""
        if batch is None:
            raise DitscopeError(f"cannot tell the batch size of {type(self.model).__name__}'s input")
        n_prompts = self.prompts_per_sample
        nb = len(self.batched_branches)
        if n_prompts is None:
            if batch % nb:
                raise DitscopeError(f"batch of {batch} does not split into branches {self.batched_branches}")
            n_prompts = batch // nb
        if batch == nb * n_prompts and (nb > 1 or self.step_on == "forward"):
            return self.batched_branches, n_prompts
        if batch == n_prompts:
            call = self._calls_this_step
            if call >= len(self.separate_branches):
                raise DitscopeError(
                    f"{call + 1} model calls in one step but only branches {self.separate_branches} are known"
                )
            return (self.separate_branches[call],), n_prompts
        raise DitscopeError(
            f"model batch {batch} matches neither {n_prompts} prompts nor {nb} guidance branches of them"
        )

    # -------------------------------------------------------------------------------- layer hooks
    def _layer_pre(self, layer: _Layer):
        def hook(module, args, kwargs):
            if layer.index < 0:
                layer.index = len(self.layer_names)
                self.layer_names.append(layer.name)
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            layer.hidden_len = _tokens(hidden)
            layer.text_len = _tokens(enc) if isinstance(enc, torch.Tensor) else None
            layer.calls = []
            if layer.output_only:  # attention layers inside it keep their own capture
                layer.inputs = tuple(t for t in (hidden, enc) if isinstance(t, torch.Tensor))
                return
            self._active = layer

        return hook

    def _layer_post(self, layer: _Layer):
        def hook(module, args, output):
            if layer.output_only:
                layer.calls = [{"out": self._reduce_written(layer, output)}]
                layer.inputs = ()
                self._collect(layer)
                return
            self._active = None
            if not layer.calls:
                raise DitscopeError(
                    f"attention layer {layer.name} ({type(module).__name__}) ran without calling "
                    "scaled_dot_product_attention: its attention backend bypasses it. Use the native "
                    "backend (e.g. transformer.set_attention_backend('native')) to profile this model"
                )
            if "out" in self.targets:
                layer.calls.append({"out": self._reduce_output(layer, output)})
            self._collect(layer)

        return hook

    # ------------------------------------------------------------------------------- the capture
    def _sdpa(self, query, key, value, *args, **kwargs):
        out = self._orig_sdpa(query, key, value, *args, **kwargs)
        layer = self._active
        if layer is not None and torch.is_tensor(out) and query.dim() == 4:
            call = len(layer.calls)
            tensors = {"q": query, "k": key, "v": value, "a": out}
            reduced = {}
            for target in self.targets:
                if target == "out":
                    continue
                x = tensors[target]
                if self._gathered(
                    layer, query.shape[2]
                ):  # this rank's heads over every rank's tokens in turn
                    n, sq, sk = self._ulysses, query.shape[2], key.shape[2]
                    part = (sq if target in ("q", "a") else sk) // n
                    streams = [
                        (name, r * part + a, r * part + b)
                        for r in range(n)
                        for name, a, b in self._streams(layer, sq // n, sk // n, target)
                    ]
                else:
                    streams = self._streams(layer, query.shape[2], key.shape[2], target)
                reduced[target] = self._reduce(layer, call, target, x, streams)
            layer.calls.append(reduced)
        return out

    def _gathered(self, layer: _Layer, sq: int) -> bool:
        """Whether an attention call saw every rank's tokens (Ulysses gathers the sequence and splits the
        heads; an attention left unsplit, such as a cross-attention, sees this rank's tokens)."""
        if self._ulysses == 1:
            return False
        mine = [layer.hidden_len, layer.hidden_len + (layer.text_len or 0)]
        return sq in [self._ulysses * m for m in mine]

    def _streams(self, layer: _Layer, sq: int, sk: int, target: str) -> list[tuple[str, int, int]]:
        """Split a sequence axis (one rank's part of it under Ulysses) into named token streams:
        [(stream, start, end)]."""
        n = sq if target in ("q", "a") else sk
        hid, txt = layer.hidden_len, layer.text_len
        model_text = (
            self._text_len // self._ulysses if self._text_len else None
        )  # the text in one rank's part
        joint_text = None
        if txt is not None and sq == sk and hid < sq <= hid + txt:
            joint_text = sq - hid  # joint attention (Mochi keeps only each sample's valid text tokens)
        elif txt is not None and sq == hid and sk == txt:
            return [(IMAGE, 0, n)] if target in ("q", "a") else [(TEXT, 0, n)]  # cross-attention
        elif txt is None and layer.single_stream and model_text and sq == sk and sq > model_text:
            joint_text = model_text  # already-joined sequence (Flux single-stream blocks)
        if joint_text is None:
            return [(IMAGE, 0, n)]
        first, _ = self.family.joint_order
        if first == TEXT:
            return [(TEXT, 0, joint_text), (IMAGE, joint_text, n)]
        return [(IMAGE, 0, n - joint_text), (TEXT, n - joint_text, n)]

    def _reduce(self, layer: _Layer, call: int, target: str, x: torch.Tensor, streams):
        # separate guidance passes of one step run the same layer once each: each keeps its own previous step
        slot = (layer.index, self._branch_of_call[0], call, target)
        prev = self._prev.get(slot)
        if prev is not None and prev.shape != x.shape:
            raise DitscopeError(
                f"layer {layer.name} {target.upper()} changed shape from {tuple(prev.shape)} to "
                f"{tuple(x.shape)} between steps; profile one resolution and prompt length per run"
            )
        sums = reduce_sums(x, prev, [(a, b) for _, a, b in streams], self._scratch)
        if prev is None:  # allocated once; later steps overwrite it, so memory stays at one step's tensors
            dtype = self.storage_dtype or x.dtype
            if self.offload:
                prev = torch.empty(x.shape, dtype=dtype, device="cpu", pin_memory=x.is_cuda)
            else:  # x's memory layout (often a permuted view): the copy and the difference run in memory order
                prev = torch.empty_like(x, dtype=dtype)
            self._prev[slot] = prev
        prev.copy_(x.detach(), non_blocking=self.offload)
        per_entry = x.shape[1] * x.shape[3]
        numel = np.array([(b - a) * per_entry for _, a, b in streams], np.float64)
        names = list(dict.fromkeys(s for s, _, _ in streams))
        if len(names) < len(streams):  # a stream in several ranges (Ulysses: one per rank): their sums added
            where = [names.index(s) for s, _, _ in streams]
            sums = sums.new_zeros(*sums.shape[:2], len(names)).index_add_(
                2, torch.tensor(where, device=sums.device), sums
            )
            numel = np.bincount(where, weights=numel, minlength=len(names))
        return sums, numel, names

    def _reduce_output(self, layer: _Layer, output):
        """The module's (projected) output as one more target, shaped like attention tensors."""
        parts = output if isinstance(output, tuple) else (output,)
        parts = [p for p in parts if isinstance(p, torch.Tensor)]
        if len(parts) >= 2:  # joint modules return (image, text)
            x = torch.cat([parts[0], parts[1]], dim=1).unsqueeze(1)
            streams = [(IMAGE, 0, parts[0].shape[1]), (TEXT, parts[0].shape[1], x.shape[2])]
        else:
            x = parts[0].unsqueeze(1)
            n = x.shape[2]
            streams = self._streams(layer, n, n, "a") if layer.single_stream else [(IMAGE, 0, n)]
        return self._reduce(layer, 0, "out", x, streams)

    def _reduce_written(self, layer: _Layer, output):
        """What an output-only module writes into the stream: a block's residual (output minus the input
        of the same shape), an MLP's output; image and text parts as streams."""
        parts = [
            p for p in (output if isinstance(output, tuple) else (output,)) if isinstance(p, torch.Tensor)
        ]
        written = []
        for part in parts:
            same = next((x for x in layer.inputs if x.shape == part.shape), None)
            if (
                same is None and self._group is not None
            ):  # the sequence split at this module: this rank's part
                same = next(
                    (
                        _my_part(x, self._group)
                        for x in layer.inputs
                        if x.dim() == part.dim() >= 3
                        and x.shape[1] == self._ulysses * part.shape[1]
                        and x.shape[2:] == part.shape[2:]
                    ),
                    None,
                )
            written.append(part - same if same is not None else part)
        image = [w for w in written if w.dim() >= 3 and w.shape[1] == layer.hidden_len] or written[:1]
        text = [
            w
            for w in written
            if w is not image[0]
            and w.dim() == image[0].dim()
            and w.shape[-1] == image[0].shape[-1]
            and w.shape[0] == image[0].shape[0]
        ][:1]
        x = image[0] if image[0].dim() >= 3 else image[0].unsqueeze(1)
        streams = [(IMAGE, 0, x.shape[1])]
        if text:
            streams.append((TEXT, x.shape[1], x.shape[1] + text[0].shape[1]))
            x = torch.cat([x, text[0]], dim=1)
        return self._reduce(layer, 0, "out", x.flatten(2).unsqueeze(1), streams)

    def _collect(self, layer: _Layer):
        """Fold this layer's calls into per-(target, stream, branch) rows of the current step."""
        branches, n_prompts = self._branch_of_call
        by_target: dict[str, list] = {}
        for call in layer.calls:
            for target, item in call.items():
                by_target.setdefault(target, []).append(item)
        for target, items in by_target.items():
            streams = items[0][2]
            if any(it[2] != streams for it in items):
                raise DitscopeError(
                    f"layer {layer.name}: attention calls of one step disagree on token streams"
                )
            sums = torch.cat([it[0] for it in items], dim=1)  # (4, N, streams)
            numel = np.concatenate([np.broadcast_to(it[1], (it[0].shape[1], len(streams))) for it in items])
            n_entries = sums.shape[1]
            n_model = n_prompts * len(branches)
            if n_entries % n_model:
                raise DitscopeError(
                    f"layer {layer.name}: {n_entries} attention batch entries do not fold onto a batch of {n_model}"
                )
            k = n_entries // n_model  # entries per model sample, batch-major (Latte: B x patches)
            sums = sums.reshape(N_SUMS, n_model, k, len(streams)).sum(2)
            numel = numel.reshape(n_model, k, len(streams)).sum(1)
            for b, branch in enumerate(branches):
                chunk = slice(b * n_prompts, (b + 1) * n_prompts)
                for s, stream in enumerate(streams):
                    key = (layer.index, target, stream, branch)
                    self._pending.append((key, sums[:, chunk, s], numel[chunk, s]))

    # ---------------------------------------------------------------------------------- the step
    def end_step(self, timestep=None):
        """Finish a step: one device-to-host transfer, then distances against the previous step."""
        if timestep is not None:
            self._step_timestep = (
                timestep.detach().flatten()[:1].clone() if torch.is_tensor(timestep) else timestep
            )
        if not self._pending:
            self._calls_this_step = 0
            return
        host = torch.cat([s for _, s, _ in self._pending], dim=1).cpu().numpy().astype(np.float64)  # the sync
        if self._group is not None:  # each rank holds its heads' or tokens' part of every sum: add them up
            host, numels = _added_over(self._group, host, [numel for _, _, numel in self._pending])
            self._pending = [
                (key, dev, numel) for (key, dev, _), numel in zip(self._pending, numels, strict=True)
            ]
        step = len(self._steps)
        values: dict[Key, np.ndarray] = {}
        col = 0
        for key, dev, numel in self._pending:
            n = dev.shape[1]
            sums = host[:, col : col + n]
            col += n
            if not np.all(np.isfinite(sums[3])):
                layer, target, stream, branch = key
                raise DitscopeError(
                    f"NaN or inf in {target.upper()} of layer {self.layer_names[layer]} at step {step} "
                    f"({stream} tokens, {branch} branch); check the model's dtype and inputs"
                )
            if key in values:
                raise DitscopeError(
                    f"layer {self.layer_names[key[0]]} ran twice in one step for the {key[3]} branch"
                )
            prev = self._host_prev.get(key)
            if prev is not None:
                values[key] = metrics_from_sums(sums, prev[0], prev[1], numel)
            elif step > 0:
                raise DitscopeError(f"layer {self.layer_names[key[0]]} did not run at step {step - 1}")
            else:
                values[key] = np.zeros((n, 3))
            self._host_prev[key] = (sums[1], sums[3])
        self._steps.append(values)
        self._timesteps.append(self._step_timestep)
        self._pending = []
        self._calls_this_step = 0
        self._step_timestep = None
        if self.on_step is not None:
            self.on_step(len(self._steps))


def _sequence_split(model: torch.nn.Module):
    """(process group, Ulysses degree) of a transformer split by diffusers' context parallelism; (None, 1)
    when it is not. Every sum the recorder takes then is a part (its heads of every token in attention,
    its tokens elsewhere), and the parts add up to the one-process sum; tensors every rank holds whole
    (a text stream that is not split) add up to the degree times theirs, which leaves every metric, a
    ratio or a mean, as it is."""
    from ..parallel import run_layout, sequence_group

    group = sequence_group(model)
    if group is None:
        return None, 1
    layout = run_layout(model)
    if layout["ring_degree"] > 1:
        raise DitscopeError(
            "profiling a transformer split by ring attention is not supported (its attention "
            "output exists only in parts): profile it unsplit, or split by ulysses_degree"
        )
    return group, layout["ulysses_degree"]


def _my_part(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's equal part of `x` along the token axis, as diffusers' context parallelism splits it."""
    import torch.distributed as dist

    return x.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)]


def _added_over(group, host: np.ndarray, numels: list[np.ndarray]):
    """`host` and every array of `numels`, each added over the ranks of `group` (the same on every rank)."""
    from ..parallel import agree

    sizes = [len(n) for n in numels]
    flat = np.concatenate([host.ravel(), *numels])
    total = agree(torch.from_numpy(flat)[None], group)[0].numpy()
    host = total[: host.size].reshape(host.shape)
    return host, np.split(total[host.size :], np.cumsum(sizes)[:-1])


def output_sites(model: torch.nn.Module, which: str) -> list[str]:
    """Regexes of a covered family's output-only sites: "mlp" (every block's MLPs), "blocks" (every block,
    recorded by its residual), or both ("mlp,blocks"), from the family table's block layout."""
    layout = family_of(model).blocks
    if layout is None:
        raise DitscopeError(
            f"{type(model).__name__} has no block layout in the family table: name its modules "
            "with outputs='pattern'"
        )
    wanted = {w.strip() for w in which.split(",") if w.strip()}
    unknown = wanted - {"mlp", "blocks"}
    if unknown or not wanted:
        raise DitscopeError(
            f"unknown output sites {sorted(unknown) or which!r}; use mlp, blocks or mlp,blocks"
        )
    patterns = []
    for name in layout.lists:
        if "blocks" in wanted:
            patterns.append(rf"{re.escape(name)}\.\d+")
        if "mlp" in wanted:
            patterns += [
                rf"{re.escape(name)}\.\d+\.{re.escape(m.name)}" for m in layout.modules if m.kind == "mlp"
            ]
    return patterns


def _tokens(x) -> int:
    if not isinstance(x, torch.Tensor):
        return 0
    if x.dim() == 4:  # (B, C, H, W) inputs of UNet-style attention
        return x.shape[2] * x.shape[3]
    return x.shape[1] if x.dim() >= 2 else 0
