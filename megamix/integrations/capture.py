"""Generic capture of projected per-sample LM-head gradients, with no access to W and no model rewrite.

How it works (for an LM head ``z = a Wᵀ`` with input ``a [B,T,d]`` and output logits ``z [B,T,V]``):

1. A forward hook on the LM-head module stores ``a`` (detached) and registers a tensor hook on ``z``.
2. In the ordinary backward pass that tensor hook receives ``dL/dz = δ`` ``[B,T,V]``. It already holds
   the loss's own scaling, the gradient-accumulation scaling, and zeros on ignored tokens.
3. The hook computes ``u = δ P1ᵀ`` (chunked over tokens, in fp32) and ``w = a P2ᵀ`` and reduces them
   per sample: ``g_i = Σ_t u_t w_tᵀ`` (``[k1, k2]`` flattened row-major to ``k1*k2``), which equals
   ``P1 G_i P2ᵀ`` for the exact per-sample LM-head weight gradient ``G_i = Σ_t δ_t a_tᵀ``.
4. It hands ``g [B, k1*k2]`` (fp32) and the context bound at forward time to a callback.

The hook never changes the gradient, so training is bit-identical with or without the capture.
It works for any loss function, for tied embeddings (only the LM-head use of the matrix is seen),
for ZeRO-3 (W is never read), for bf16 (u and w are computed in fp32) and for gradient accumulation
(one callback per micro-step backward).

Example::

    cap = LMHeadGradCapture(model.lm_head, projection, lambda g, ctx: stats.update(g, ctx["domain_ids"]))
    cap.set_context({"domain_ids": batch.domain_ids})
    loss = model(input_ids, labels=labels).loss
    loss.backward()          # the callback runs here
    cap.remove()
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Protocol

import torch
from torch import nn

_ATTR = "_megamix_grad_capture"

GradCallback = Callable[[torch.Tensor, Any], None]


class ProjectionLike(Protocol):
    """Anything with the two projection matrices ``P1 [k1, V]`` and ``P2 [k2, d]``."""

    P1: torch.Tensor
    P2: torch.Tensor


def project_per_sample(delta: torch.Tensor, a: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor,
                       *, chunk_tokens: int = 4096) -> torch.Tensor:
    """Projected per-sample gradients ``g_i = Σ_t (P1 δ_t)(P2 a_t)ᵀ`` for a ``[B, T, ·]`` batch.

    Args:
        delta: ``[B, T, V]`` gradient of the loss w.r.t. the logits (any float dtype).
        a: ``[B, T, d]`` LM-head input.
        P1: ``[k1, V]`` vocab-side projection.
        P2: ``[k2, d]`` hidden-side projection.
        chunk_tokens: tokens per chunk for ``δ P1ᵀ``, which bounds the fp32 upcast copy of ``δ``.

    Returns:
        ``g [B, k1*k2]`` in fp32 (row-major flattening of ``[k1, k2]``).
    """
    return reduce_per_sample(project_u(delta, P1, chunk_tokens=chunk_tokens), project_w(a, P2))


def project_u(delta: torch.Tensor, P1: torch.Tensor, *, chunk_tokens: int = 4096) -> torch.Tensor:
    """``u = δ P1ᵀ`` in fp32, computed over chunks of tokens. ``delta [..., V]`` -> ``[..., k1]``."""
    if delta.shape[-1] != P1.shape[1]:
        raise ValueError(f"logit gradient has vocab size {delta.shape[-1]} but P1 is {tuple(P1.shape)} "
                         "(P1 must be [k1, V] with the LM head's output size V)")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
    lead = delta.shape[:-1]
    flat = delta.reshape(-1, delta.shape[-1])
    p1t = P1.to(device=delta.device, dtype=torch.float32).t()
    n = flat.shape[0]
    if n <= chunk_tokens:
        u = flat.to(torch.float32) @ p1t
    else:
        u = torch.empty(n, P1.shape[0], device=delta.device, dtype=torch.float32)
        for s in range(0, n, chunk_tokens):
            torch.matmul(flat[s:s + chunk_tokens].to(torch.float32), p1t, out=u[s:s + chunk_tokens])
    return u.reshape(*lead, P1.shape[0])


def project_w(a: torch.Tensor, P2: torch.Tensor) -> torch.Tensor:
    """``w = a P2ᵀ`` in fp32. ``a [..., d]`` -> ``[..., k2]``."""
    if a.shape[-1] != P2.shape[1]:
        raise ValueError(f"LM-head input has size {a.shape[-1]} but P2 is {tuple(P2.shape)} "
                         "(P2 must be [k2, d] with the LM head's input size d)")
    return a.to(torch.float32) @ P2.to(device=a.device, dtype=torch.float32).t()


def reduce_per_sample(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g_i = Σ_t u_t w_tᵀ`` for ``u [B,T,k1]``, ``w [B,T,k2]`` -> ``[B, k1*k2]`` (fp32)."""
    if u.dim() != 3 or w.dim() != 3 or u.shape[:2] != w.shape[:2]:
        raise ValueError(f"u and w must be [B,T,k1] and [B,T,k2] (got {tuple(u.shape)} and {tuple(w.shape)})")
    B = u.shape[0]
    return torch.bmm(u.transpose(1, 2), w).reshape(B, -1)


class LMHeadGradCapture:
    """Hooks on an LM-head module that emit projected per-sample gradients during backward.

    Args:
        lm_head: the module that maps hidden states ``[B,T,d]`` to logits ``[B,T,V]`` (e.g. ``nn.Linear``).
            Its first positional input must be the hidden states and its output the logits tensor
            (or a tuple whose first element is the logits). None: no module hook; feed the capture
            with :meth:`tap` instead.
        projection: an object with ``P1 [k1, V]`` and ``P2 [k2, d]`` (e.g. ``kernels.projection.Projection``).
        callback: ``callback(g, context)`` with ``g [B, k1*k2]`` fp32 (detached) and the context that was
            set with :meth:`set_context` when the forward ran. Called once per backward through the head.
            A callback that takes a single argument is called as ``callback(g)``.
        chunk_tokens: tokens per chunk in ``δ P1ᵀ``.
        seq_first: inputs and logits are ``[T, B, ...]`` (Megatron layout) instead of ``[B, T, ...]``.
        u_transform: optional ``f(u) -> u`` applied to ``u [B,T,k1]`` before the per-sample reduction
            (the tensor-parallel capture uses it to all-reduce partial ``u`` across vocab shards).

    Attaching a second capture to the same module replaces the first (with a warning), so statistics
    are never counted twice.
    """

    def __init__(self, lm_head: nn.Module | None, projection: ProjectionLike, callback: GradCallback, *,
                 chunk_tokens: int = 4096, seq_first: bool = False,
                 u_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if lm_head is not None and not isinstance(lm_head, nn.Module):
            raise TypeError(f"lm_head must be an nn.Module or None, got {type(lm_head).__name__}")
        if not callable(callback):
            raise TypeError("callback must be callable as callback(g, context)")
        for name in ("P1", "P2"):
            if not isinstance(getattr(projection, name, None), torch.Tensor):
                raise TypeError(f"projection must have a tensor attribute {name}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
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
        self.u_transform = u_transform
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
        """Context for the next forward passes (e.g. the micro-batch's domain ids). It is bound to
        each forward when it runs, so several forwards may be in flight before their backwards."""
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
    def _projections(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # .to() is free when the projection is already fp32 on this device
        return (self.projection.P1.to(device=device, dtype=torch.float32),
                self.projection.P2.to(device=device, dtype=torch.float32))

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("LMHeadGradCapture: the LM head's first positional input must be the hidden "
                            "states tensor [B,T,d]")
        self.tap(args[0], logits)

    def tap(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Capture from an explicit (hidden, logits) pair, for LM heads that are functions rather than
        modules (e.g. Megatron's ``parallel_lm_logits``). The forward hook calls this for modules.
        Does nothing without autograd or when the capture is disabled/removed."""
        if self._removed or not self.enabled or not torch.is_grad_enabled():
            return
        if not isinstance(logits, torch.Tensor) or not logits.requires_grad:
            return
        a = hidden.detach()
        if a.dim() == 2:
            a = a.unsqueeze(0)
        ctx = self.context

        def _tensor_hook(grad: torch.Tensor) -> None:
            if self._removed:
                return None
            g = self._compute(grad, a)
            self.calls += 1
            if self._pass_context:
                self.callback(g, ctx)
            else:
                self.callback(g)
            return None

        logits.register_hook(_tensor_hook)

    def _compute(self, grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = grad.detach()
            if delta.dim() == 2:
                delta = delta.unsqueeze(0)
            if self.seq_first:  # Megatron's [T, B, ...] layout
                delta, a = delta.transpose(0, 1), a.transpose(0, 1)
            if delta.shape[:2] != a.shape[:2]:
                raise RuntimeError(f"LMHeadGradCapture: logits grad {tuple(delta.shape)} does not match the "
                                   f"stored LM-head input {tuple(a.shape)}")
            P1, P2 = self._projections(delta.device)
            u = project_u(delta, P1, chunk_tokens=self.chunk_tokens)
            if self.u_transform is not None:
                u = self.u_transform(u)
            w = project_w(a, P2)
            return reduce_per_sample(u, w)


def _accepts_two_args(fn: Callable) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
        return True
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume the documented form
        return True


def find_lm_head(model: nn.Module) -> nn.Module:
    """Locate the LM-head module of common model classes.

    Tries ``get_output_embeddings()`` (HF transformers), then attributes named ``lm_head``,
    ``output_layer`` (Megatron) and ``head``. Unwraps DeepSpeed/DDP ``.module`` wrappers.
    """
    m = model
    for _ in range(4):
        inner = getattr(m, "module", None)
        if isinstance(inner, nn.Module):
            m = inner
        else:
            break
    get = getattr(m, "get_output_embeddings", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head
    for name in ("lm_head", "output_layer", "head"):
        head = getattr(m, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"could not find the LM head of {type(m).__name__}: pass the module explicitly "
                     "(tried get_output_embeddings(), .lm_head, .output_layer, .head)")


__all__ = ["LMHeadGradCapture", "project_per_sample", "project_u", "project_w", "reduce_per_sample",
           "find_lm_head"]
