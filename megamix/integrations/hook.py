"""The capture path: projected per-sample LM-head gradients read from an unmodified model's backward.

Use it when megamix does not own the loss (any loss function, any model); when it does, the fused
path (:mod:`megamix.integrations.hf`, ``Mixer.loss_and_stats``) is cheaper: it never materialises the
``[B, T, V]`` logits and computes ``u`` inside the cross-entropy pass.

How the capture works, for an LM head ``z = a Wᵀ`` with input ``a [B,T,d]`` and logits ``z [B,T,V]``:

1. A forward hook on the LM-head module stores ``a`` (detached) and registers a tensor hook on ``z``.
2. In the ordinary backward pass that tensor hook receives ``dL/dz = δ`` ``[B,T,V]``. It already holds
   the loss's own scaling, the gradient-accumulation scaling and zeros on ignored tokens.
3. ``u = δ P1ᵀ`` (:func:`megamix.kernels.projection.project_u`: chunks of ``chunk_tokens`` rows, bf16/fp16
   operands with fp32 accumulation when δ is bf16/fp16) and ``w = a P2ᵀ``; the per-sample reduction
   ``g_i = Σ_t u_t w_tᵀ`` is :func:`megamix.kernels.domain_gram.per_sample_grads` (Triton on CUDA), and the
   projection's optional dense second stage (``projection.k``) is applied by ``projection.finalize``.
4. ``g [B, k]`` (fp32) and the context bound at forward time go to a callback.

The hooks never change a gradient, so training is bit-identical with or without the capture. It
works for tied embeddings (only the LM-head use of the matrix is seen), ZeRO-3 (W is never read),
bf16 and gradient accumulation (one callback per micro-step backward). The one exception is asked for:
with ``grad_weights`` (DoGraph's in-step reweighting, wired by :func:`attach` when the Mixer's strategy
reweights) the tensor hook returns δ scaled per sample, so the weighted gradient reaches the LM head and,
through it, the whole network.

Layouts: HF models feed the head ``[B, T, d]``; Megatron-core's ``GPTModel.output_layer`` (a
``ColumnParallelLinear``) is fed ``[T, B, d]``. :func:`find_lm_head` returns the layout together with
the head, so :func:`attach` never reduces over the wrong axis (a shape check cannot tell the two
apart when ``seq_len == micro_batch_size``).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch
from torch import nn

from megamix.kernels.domain_gram import per_sample_grads
from megamix.kernels.projection import Projection, project_u, project_w

_ATTR = "_megamix_grad_capture"
_ATTACH_ATTR = "_megamix_hook"

GradCallback = Callable[[torch.Tensor, Any], None]


class LMHeadGradCapture:
    """Hooks on an LM-head module that emit projected per-sample gradients during backward.

    Args:
        lm_head: the module mapping hidden states to logits (e.g. ``nn.Linear``). Its first positional
            input must be the hidden states and its output the logits (or a tuple whose first element is
            the logits, as Megatron's ``ColumnParallelLinear`` returns). None: no module hook; feed the
            capture with :meth:`tap` instead (functional heads such as ``parallel_lm_logits``).
        projection: a :class:`megamix.kernels.projection.Projection` (``P1 [k1, V]``, ``P2 [k2, d]``, optional
            second stage).
        callback: ``callback(g, context)`` with ``g [B, projection.k]`` fp32 (detached) and the context
            set with :meth:`set_context` when the forward ran. A one-argument callback gets ``g`` only.
        chunk_tokens: rows of δ multiplied by ``P1ᵀ`` at a time.
        backend: per-sample reduction backend: ``auto`` (Triton on CUDA) | ``torch`` | ``triton``.
        seq_first: inputs and logits are ``[T, B, ...]`` (Megatron) instead of ``[B, T, ...]``.
        u_transform: optional ``f(u) -> u`` applied to ``u [B,T,k1]`` before the reduction (the
            tensor-parallel capture all-reduces the partial ``u`` of each vocab shard with it).
        grad_weights: optional ``f(g, context) -> [B] | None``, called after ``callback``: per-sample
            factors the logits gradient is multiplied by (None: unchanged). This changes training.

    Attaching a second capture to the same module replaces the first (with a warning), so statistics
    are never counted twice.
    """

    def __init__(self, lm_head: nn.Module | None, projection: Projection, callback: GradCallback, *,
                 chunk_tokens: int = 4096, backend: str = "auto", seq_first: bool = False,
                 u_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 grad_weights: Callable[[torch.Tensor, Any], torch.Tensor | None] | None = None) -> None:
        if lm_head is not None and not isinstance(lm_head, nn.Module):
            raise TypeError(f"lm_head must be an nn.Module or None, got {type(lm_head).__name__}")
        if not callable(callback):
            raise TypeError("callback must be callable as callback(g, context)")
        if not isinstance(projection, Projection):
            raise TypeError("projection must be a megamix.kernels.projection.Projection (make_projection(...) or "
                            f"Projection(P1, P2, kind=...)), got {type(projection).__name__}")
        if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
            raise ValueError(f"chunk_tokens must be a positive int (got {chunk_tokens!r})")
        old = getattr(lm_head, _ATTR, None) if lm_head is not None else None
        if old is not None:
            warnings.warn("LMHeadGradCapture: a capture was already attached to this module; replacing it "
                          "so statistics are not counted twice", stacklevel=2)
            old.remove()
        self.module = lm_head
        self.projection = projection
        self.callback = callback
        self._pass_context = _accepts_two_args(callback)
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.u_transform = u_transform
        self.grad_weights = grad_weights
        self.seq_first = seq_first
        self.enabled = True
        self.context: Any = None
        self.calls = 0  # number of callbacks made (for diagnostics and tests)
        self._removed = False
        self._handle = None
        if lm_head is not None:
            self._handle = lm_head.register_forward_hook(self._forward_hook)
            setattr(lm_head, _ATTR, self)

    @classmethod
    def attached(cls, lm_head: nn.Module) -> "LMHeadGradCapture | None":
        """The capture currently attached to ``lm_head``, if any."""
        return getattr(lm_head, _ATTR, None)

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return not self._removed

    def set_context(self, context: Any) -> None:
        """Context for the next forward passes (e.g. the micro-batch). It is bound to each forward when
        it runs, so several forwards may be in flight before their backwards."""
        self.context = context

    def remove(self) -> None:
        """Detach the hooks. Safe to call more than once. Pending tensor hooks become no-ops."""
        self._removed = True
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.module is not None and getattr(self.module, _ATTR, None) is self:
            delattr(self.module, _ATTR)

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("LMHeadGradCapture: the LM head's first positional input must be the hidden "
                            "states tensor")
        self.tap(args[0], logits)

    def tap(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Capture from an explicit (hidden, logits) pair (for functional LM heads). The forward hook
        calls this for modules. Does nothing without autograd or when disabled/removed."""
        if self._removed or not self.enabled or not torch.is_grad_enabled():
            return
        if not isinstance(logits, torch.Tensor) or not logits.requires_grad:
            return
        a = hidden.detach()
        ctx = self.context

        def _tensor_hook(grad: torch.Tensor) -> None:
            if self._removed:
                return None
            g = self.compute(grad, a)
            self.calls += 1
            if self._pass_context:
                self.callback(g, ctx)
            else:
                self.callback(g)
            if self.grad_weights is not None:
                w = self.grad_weights(g, ctx)
                if w is not None:
                    return self._weighted(grad, w)
            return None

        logits.register_hook(_tensor_hook)

    def _weighted(self, grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The logits gradient with sample ``i``'s slice multiplied by ``w[i]`` (layout per ``seq_first``)."""
        w = w.to(device=grad.device, dtype=grad.dtype)
        if grad.dim() == 2:          # one sample (compute() treats a 2-D gradient as [T, V] of one sample)
            return grad * w[0]
        return grad * (w[None, :, None] if self.seq_first else w[:, None, None])

    def compute(self, delta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``g [B, k]`` from the logits gradient ``delta`` and the head input ``a`` (layout per ``seq_first``).

        ``u = δ P1ᵀ`` is formed in δ's own layout (a view of it, never a copy of the ``[.., .., V]`` gradient), and
        only the small ``u [.., .., k1]`` and ``w`` are put in batch-first order; no host sync."""
        with torch.no_grad():
            delta = delta.detach()
            if delta.dim() == 2:
                delta, a = delta.unsqueeze(1 if self.seq_first else 0), a.unsqueeze(1 if self.seq_first else 0)
            if delta.shape[:2] != a.shape[:2]:
                raise RuntimeError(f"LMHeadGradCapture: logits grad {tuple(delta.shape)} does not match the "
                                   f"stored LM-head input {tuple(a.shape)}")
            u = project_u(delta, self.projection, chunk_tokens=self.chunk_tokens)
            if self.u_transform is not None:
                u = self.u_transform(u)
            w = project_w(a, self.projection)
            if self.seq_first:  # Megatron's [T, B, ...] layout: reorder the projections, not δ
                u, w = u.transpose(0, 1), w.transpose(0, 1)
            B, T = u.shape[:2]
            g = per_sample_grads(u.reshape(B * T, -1), w.reshape(B * T, -1), tokens_per_sample=T)
            return self.projection.finalize(g)


def _accepts_two_args(fn: Callable) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
        return True
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume the documented form
        return True


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost model under DeepSpeed / DDP / Megatron ``Float16Module`` ``.module`` wrappers."""
    m = model
    for _ in range(6):
        inner = getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    return m


def _is_megatron(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "megatron"


def find_lm_head(model: nn.Module) -> tuple[nn.Module, bool]:
    """Locate the LM head of a model and its layout: ``(head, seq_first)``.

    Tries ``get_output_embeddings()`` (HF transformers, ``[B, T, d]``), then ``output_layer``
    (Megatron-core ``GPTModel`` and other Megatron-style models, ``[T, B, d]``), ``lm_head`` and ``head``
    (``[B, T, d]``). A bare head (an ``nn.Linear`` or Megatron ``ColumnParallelLinear`` passed as
    ``model``) is returned as is. Unwraps DeepSpeed/DDP ``.module`` wrappers.
    """
    m = unwrap(model)
    get = getattr(m, "get_output_embeddings", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head, False
    head = getattr(m, "output_layer", None)
    if isinstance(head, nn.Module):
        return head, True
    for name in ("lm_head", "head"):
        head = getattr(m, name, None)
        if isinstance(head, nn.Module):
            return head, _is_megatron(head)
    if isinstance(m, nn.Linear) or type(m).__name__ in ("ColumnParallelLinear", "VocabParallelLinear"):
        return m, _is_megatron(m)
    raise ValueError(f"could not find the LM head of {type(m).__name__}: pass it as attach(model, mixer, "
                     "lm_head=...) (tried get_output_embeddings(), .output_layer, .lm_head, .head)")


def _head_shape(lm_head: nn.Module) -> tuple[int, int]:
    """(V, d) of an LM head, also under ZeRO-3 (where ``weight`` is a placeholder with ``ds_shape``)."""
    W = getattr(lm_head, "weight", None)
    if W is not None:
        shape = tuple(getattr(W, "ds_shape", W.shape))
        if len(shape) == 2 and shape[0] > 0:
            return int(shape[0]), int(shape[1])
    out_f, in_f = getattr(lm_head, "out_features", None), getattr(lm_head, "in_features", None)
    if out_f and in_f:
        return int(out_f), int(in_f)
    raise ValueError("cannot tell the LM head's (V, d); pass vocab_size and hidden_size to attach()")


def _module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def _is_engine(obj: Any) -> bool:
    return type(obj).__name__.endswith("Engine") and hasattr(obj, "backward") and hasattr(obj, "module")


class MixerHook:
    """What :func:`attach` returns: wires a Mixer to a training loop through the capture.

    Per micro-step: call :meth:`set_batch` before the forward (and optionally :meth:`record_loss`
    after it, for per-domain train losses). The statistics reach ``mixer.stats`` in the backward.
    After each optimizer step, :meth:`after_optimizer_step` runs ``mixer.step``; when attached to a
    DeepSpeed engine with ``auto_step=True`` that happens inside ``engine.step()`` at each
    gradient-accumulation boundary.
    """

    path = "capture"

    def __init__(self, target: nn.Module, mixer: Any, lm_head: nn.Module, *, seq_first: bool,
                 dp_world_size: int, auto_step: bool, vocab_size: int | None = None,
                 hidden_size: int | None = None):
        V, d = (vocab_size, hidden_size) if vocab_size and hidden_size else _head_shape(lm_head)
        projection = mixer.head.projection_for(V, d, _module_device(lm_head))
        p = mixer.cfg.projection
        self.target = target
        self.mixer = mixer
        self.lm_head = lm_head
        self.seq_first = bool(seq_first)
        self.dp_world_size = int(dp_world_size)
        self.scale = 1.0 / self.dp_world_size
        self.last_update: dict | None = None
        self.micro_steps = 0
        self.capture = LMHeadGradCapture(lm_head, projection, self._on_grads, chunk_tokens=p.chunk_tokens,
                                         backend=p.backend, seq_first=self.seq_first,
                                         grad_weights=self._grad_weights)
        self._patched_step = False
        if auto_step and _is_engine(target):
            self._patch_engine_step(target)

    # per micro-step ------------------------------------------------------------------------------
    def set_batch(self, batch: Any) -> None:
        """Bind the next forward to ``batch`` (needs ``domain_ids``; ``sample_ids`` optional)."""
        if getattr(batch, "domain_ids", None) is None:
            raise ValueError("set_batch needs a batch with domain_ids (a megamix loader Batch)")
        self.capture.set_context({"batch": batch, "loss_sum": None, "count": None})

    def record_loss(self, token_loss: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
        """Per-sample train-loss totals of the current micro-batch (token_loss, labels: ``[b, T]``)."""
        ctx = self.capture.context
        if ctx is None:
            raise RuntimeError("record_loss before set_batch")
        valid = labels != ignore_index
        ctx["loss_sum"] = (token_loss.detach().float() * valid).sum(1).double()
        ctx["count"] = valid.sum(1).double()

    def _on_grads(self, g: torch.Tensor, ctx: dict | None) -> None:
        if ctx is None:
            raise RuntimeError("megamix: a backward ran through the LM head without set_batch(batch) before "
                               "its forward; call hook.set_batch(batch) for every micro-batch")
        batch = ctx["batch"]
        if g.shape[0] != batch.domain_ids.shape[0]:
            raise RuntimeError(f"megamix: the LM head saw {g.shape[0]} samples but the bound batch has "
                               f"{batch.domain_ids.shape[0]}; was set_batch called with the right batch, and is "
                               f"the head's layout right (seq_first={self.seq_first})?")
        self.micro_steps += 1
        # g stays on its device: with NCCL the accumulators must live on the GPU for the all-reduce
        self.mixer.head.record_rows(g * self.scale, batch.domain_ids, sample_ids=getattr(batch, "sample_ids", None),
                               token_loss_sum=ctx["loss_sum"], token_count=ctx["count"])

    def _grad_weights(self, g: torch.Tensor, ctx: dict | None) -> torch.Tensor | None:
        """DoGraph's per-sample weights of this micro-batch (None unless the Mixer's strategy reweights)."""
        return self.mixer.head.sample_weights(g * self.scale)

    # per optimizer step --------------------------------------------------------------------------
    def after_optimizer_step(self, step: int, **kwargs) -> dict | None:
        """Run ``mixer.step(step)`` (0-based step just completed). Returns its update dict or None."""
        self.last_update = self.mixer.step(step, **kwargs)
        return self.last_update

    def _patch_engine_step(self, engine) -> None:
        cls_step = type(engine).step

        def step(*args, **kwargs):
            before = engine.global_steps
            out = cls_step(engine, *args, **kwargs)
            if engine.global_steps != before:
                self.after_optimizer_step(engine.global_steps - 1)
            return out

        engine.step = step
        self._patched_step = True

    def remove(self) -> None:
        """Detach everything (idempotent)."""
        self.capture.remove()
        if self._patched_step and "step" in vars(self.target):
            del self.target.step
        self._patched_step = False
        if getattr(self.target, _ATTACH_ATTR, None) is self:
            delattr(self.target, _ATTACH_ATTR)


def attach(model: nn.Module, mixer: Any, *, lm_head: nn.Module | None = None, seq_first: bool | None = None,
           dp_world_size: int | None = None, auto_step: bool = True, vocab_size: int | None = None,
           hidden_size: int | None = None) -> MixerHook:
    """Feed a Mixer from an existing training loop through the capture path. Idempotent.

    Args:
        model: a plain ``nn.Module`` (HF, Megatron-core or your own), a DeepSpeed engine, or the LM head
            itself.
        mixer: a :class:`megamix.mixer.Mixer`.
        lm_head: the LM-head module (default: :func:`find_lm_head`).
        seq_first: the head's layout; default: what :func:`find_lm_head` reports (Megatron's
            ``output_layer`` is ``[s, b, h]``). Give it explicitly together with ``lm_head``.
        dp_world_size: data-parallel size for the gradient-averaging scale (default: the engine's, else
            ``mixer.world_size``).
        auto_step: on a DeepSpeed engine, run ``mixer.step`` inside ``engine.step()`` at each
            gradient-accumulation boundary. Otherwise call ``hook.after_optimizer_step(step)``.
        vocab_size, hidden_size: the LM head's (V, d) when they cannot be read from it.

    Attaching the same mixer again returns the existing hook; attaching a different mixer replaces it.
    """
    existing = getattr(model, _ATTACH_ATTR, None)
    if existing is not None:
        if existing.mixer is mixer:
            return existing
        existing.remove()
    if lm_head is None:
        lm_head, found_seq_first = find_lm_head(model)
        seq_first = found_seq_first if seq_first is None else seq_first
        full, shard = getattr(lm_head, "output_size", None), getattr(lm_head, "output_size_per_partition", None)
        if full is not None and shard is not None and full != shard:
            raise ValueError(f"the output layer of {type(unwrap(model)).__name__} is vocab-parallel ({shard} of "
                             f"{full} rows on this rank): use megamix.integrations.megatron.attach_megatron(model, "
                             "mixer, tp_group=...), which slices P1 like the shard and all-reduces u over TP")
    elif seq_first is None:
        seq_first = _is_megatron(lm_head)
    if dp_world_size is None:
        dp_world_size = getattr(model, "dp_world_size", None) or getattr(mixer, "world_size", 1)
    hook = MixerHook(model, mixer, lm_head, seq_first=seq_first, dp_world_size=dp_world_size, auto_step=auto_step,
                     vocab_size=vocab_size, hidden_size=hidden_size)
    setattr(model, _ATTACH_ATTR, hook)
    return hook


__all__ = ["LMHeadGradCapture", "MixerHook", "attach", "find_lm_head", "unwrap", "GradCallback"]
