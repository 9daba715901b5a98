"""What the compile gate (:mod:`megamix.kernels.compile_gate`) compiles: jobs of one kernel, one launch
configuration and one target, each with the launch arguments its launcher passes.

What is compiled (:func:`launch_jobs`): each kernel with the arguments its launcher passes (argument types,
constexprs, and the divisibility-by-16 / ``== 1`` specialisation Triton's JIT applies at launch) and the
tiles / warps / stages that :mod:`megamix.kernels.launch_configs` returns:

- ``_ce_delta_proj_kernel`` and ``_ce_shard_delta_kernel`` (``u_method`` fused, single device and vocab-parallel)
  for bf16 / fp16 / fp32 logits, with the projection for every k1 the launchers accept, and without it;
  ``_ce_shard_stats_kernel``; ``_proj_u_kernel`` (``u_method`` tiled); ``_segment_outer_kernel`` (the per-sample
  reduction, fp32 u and w) across the accepted (k1, k2) range, with and without a row order;
  ``_scale_kernel`` (the backward's scaling, bf16 / fp16).
- k1 is sampled, not enumerated: the launch configuration and the compiled kernel depend on k1 only through
  ``BK1 = next_pow2(k1, 16)`` and through Triton's specialisation of the integer arguments (``== 1``, divisible by
  16). Each BK1 bucket is compiled as ``aligned`` (k1 = BK1, every size a multiple of 16, every pointer 16-byte
  aligned: cp.async pipelining applies, so this is the most *shared memory* a bucket can take) and ``unaligned``
  (k1 = BK1/2 + 1, the bucket's lower boundary, with k1 = 1 for BK1 = 16; GPT-2's V = 50257; a vocab shard's P1ᵀ
  rows not 16-byte aligned: no vectorised loads, typically the most *registers*); the default buckets (k1 32, 64)
  also as ``gpt2`` (k1 = BK1 with V = 50257, the shipped GPT-2 configs).
- sm_90 (the GPUs the tiles were tuned on) gets the full matrix. sm_80 and sm_100 get the ``aligned`` variant,
  complete for shared memory (the hard limit) through proxies that the test checks on sm_90 to need the same
  shared memory: fp16 through bf16, the vocab-parallel δ kernel through the single-device one, segment_outer
  with a row order through the one without (which needs more). Their unaligned registers are not checked.
- segment_outer's configuration depends on BK1·BK2 only; each product class is compiled at its two most skewed
  pairs (the largest operand tiles), and on sm_90 also at the default pairs; aligned only (it is not on the
  training path).
- per dtype and k1 kernel, on sm_80 (the smallest limit), the first BK1 above
  :func:`~megamix.kernels.launch_configs.max_k1` at the smallest tile the policy allows (role ``refused``), to show
  the limit is real and to give the numbers the errors quote.

Which configurations are defaults (:func:`is_default`: held to the strict spill budget) is decided here too;
the candidates of ``--search`` (:func:`_search_families`) are the policy's of :mod:`megamix.kernels.launch_configs`.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamix.kernels import launch_configs as lc

#: compute capability -> GPU (for messages): every target of launch_configs.SHARED_MEMORY_LIMITS
TARGETS = dict(lc.GPU_NAMES)
#: the target that gets the full matrix (both variants); the others get the aligned variant
FULL_TARGET = 90
DTYPES = ("bf16", "fp16", "fp32")

# Example sizes of the variants (see the module docstring). V is a Llama-3 / GPT-2 vocabulary (its logits row
# stride is padded to a multiple of 16 on CUDA by the driver); the vocab shard is one rank's rows at TP=8 / TP=2.
_SIZES = {
    "aligned": {"C": 4096, "V": 128256, "V_pad": 128256, "V_shard": 16032, "V_shard_pad": 16032, "start": 16032,
                "n_scale": 128256 * 4096},
    "unaligned": {"C": 1000, "V": 50257, "V_pad": 50272, "V_shard": 25129, "V_shard_pad": 25136, "start": 25129,
                  "n_scale": 50257 * 4097 * 11},
    # the default k1 buckets only: the shipped GPT-2 configs (k1 = BK1, V = 50257; Megatron pads its shards)
    "gpt2": {"C": 4096, "V": 50257, "V_pad": 50272, "V_shard": 25152, "V_shard_pad": 25152, "start": 25152,
             "n_scale": 50257 * 768},
}
_ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


# ----------------------------------------------------------------------------------------------
# Jobs: one kernel, one configuration, one target
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    kernel: str                 # the @triton.jit function's name
    dtype: str                  # logits / δ dtype (fp32 for _segment_outer_kernel)
    bk1: int | None             # BK1 bucket (None: no projection dimension)
    bk2: int | None             # BK2 bucket (_segment_outer_kernel only)
    variant: str                # "aligned" | "unaligned" | "gpt2" (see _SIZES)
    config: tuple               # LaunchConfig as a tuple (block_m, block_v, num_warps, num_stages | None)
    target: int                 # compute capability
    has_proj: bool = False
    has_order: bool = False
    role: str = "launch"        # "launch" (a launcher's choice) | "refused" (above the limit) | "candidate" (search)

    @property
    def k1(self) -> int | None:
        return _example_k(self.bk1, self.variant)

    @property
    def k2(self) -> int | None:
        return _example_k(self.bk2, self.variant)


def _example_k(bk: int | None, variant: str) -> int | None:
    if bk is None:
        return None
    if variant != "unaligned":
        return bk
    return 1 if bk == 16 else bk // 2 + 1


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: element type and whether its data pointer is 16-byte aligned."""

    dtype: str
    aligned: bool = True


def _specialize(value) -> tuple[str, bool]:
    """(signature type, divisible by 16?) of one runtime argument, as Triton's JIT specialises it at launch
    (``triton._C.libtriton.native_specialize_impl``: an int equal to 1 becomes a constexpr, an int or a data
    pointer divisible by 16 gets ``tt.divisibility = 16``, floats are not specialised)."""
    if isinstance(value, Ptr):
        return "*" + value.dtype, value.aligned
    if isinstance(value, bool):
        raise TypeError("a bool argument must be a constexpr")
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise {value!r}")


def kernel_args(job: Job):
    """``(jit function, {argument: example value}, constexpr names)`` for ``job``, mirroring its launcher."""
    from megamix.kernels import ce_pass, domain_gram, fused_linear_ce, proj_u, vocab_parallel
    s = _SIZES[job.variant]
    aligned = job.variant == "aligned"
    bm, bv, _, _ = job.config
    dt = job.dtype
    k1 = job.k1 if job.has_proj else None
    if job.kernel in ("_ce_delta_proj_kernel", "_ce_shard_delta_kernel"):
        shard = job.kernel == "_ce_shard_delta_kernel"
        V, stride_l = (s["V_shard"], s["V_shard_pad"]) if shard else (s["V"], s["V_pad"])
        # _ce_launch: without a projection p1t_ptr is the logits, u_ptr the fp32 vector `dummy` (stride 1), K1 = 1.
        # The driver gives P1ᵀ the logits dtype (bf16/fp16 operand for low-precision logits, fp32 otherwise); a
        # vocab shard's P1ᵀ is a row slice of the full one (aligned only if start·k1·esize is).
        p1_aligned = (not shard) or (s["start"] * (k1 or 1) * _ESIZE[dt]) % 16 == 0
        args = {"logits_ptr": Ptr(dt), "stride_l": stride_l, "labels_ptr": Ptr("i64"),
                "p1t_ptr": Ptr(dt, p1_aligned) if k1 else Ptr(dt), "stride_p": k1 if k1 else 0,
                "u_ptr": Ptr("fp32"), "stride_u": k1 if k1 else 1, "C": s["C"], "V": V, "K1": k1 if k1 else 1,
                "scale_ptr": Ptr("fp32"), "p1_scale": 1.0, "ignore_index": -100,
                "HAS_PROJ": bool(k1), "BM": bm, "BV": bv, "BK1": job.bk1 if k1 else 16,
                "DOT_IEEE": (not k1) or dt == "fp32"}
        if shard:
            args.update({"lse_ptr": Ptr("fp32"), "vocab_start": s["start"]})
            fn = vocab_parallel._ce_shard_delta_kernel
        else:   # the max / sum-exp sweep keeps the projection-off tile (ce_delta_triton)
            args["loss_ptr"] = Ptr("fp32")
            args["BV_STATS"] = lc.ce_pass(s["C"], dt, None, interpret=False).block_v
            fn = ce_pass._ce_delta_proj_kernel
            return fn, args, {"HAS_PROJ", "BM", "BV", "BK1", "DOT_IEEE", "BV_STATS"}
        return fn, args, {"HAS_PROJ", "BM", "BV", "BK1", "DOT_IEEE"}
    if job.kernel == "_ce_shard_stats_kernel":
        C = s["C"]   # max / sum-exp / target logit are rows 0, 1, 2 of one fp32 [3, C] tensor
        args = {"logits_ptr": Ptr(dt), "stride_l": s["V_shard_pad"], "labels_ptr": Ptr("i64"), "max_ptr": Ptr("fp32"),
                "sumexp_ptr": Ptr("fp32", (4 * C) % 16 == 0), "zy_ptr": Ptr("fp32", (8 * C) % 16 == 0), "C": C,
                "V": s["V_shard"], "vocab_start": s["start"], "ignore_index": -100, "BM": bm, "BV": bv}
        return vocab_parallel._ce_shard_stats_kernel, args, {"BM", "BV"}
    if job.kernel == "_proj_u_kernel":
        C, V = s["C"], s["V"]
        splits = 4
        per_split = -(-(-(-V // splits)) // bv) * bv
        args = {"delta_ptr": Ptr(dt), "stride_d": s["V_pad"], "p1t_ptr": Ptr(dt, aligned),
                "stride_p": k1, "part_ptr": Ptr("fp32"), "stride_ps": C * k1, "stride_pr": k1, "C": C, "V": V,
                "K1": k1, "V_PER_SPLIT": per_split, "BM": bm, "BV": bv, "BK1": job.bk1, "DOT_IEEE": dt == "fp32"}
        return proj_u._proj_u_kernel, args, {"BM", "BV", "BK1", "DOT_IEEE"}
    if job.kernel == "_segment_outer_kernel":
        k1, k2 = job.k1, job.k2
        args = {"u_ptr": Ptr("fp32"), "stride_u": k1, "w_ptr": Ptr("fp32"), "stride_w": k2, "order_ptr": Ptr("i64"),
                "offs_ptr": Ptr("i64"), "out_ptr": Ptr("fp32"), "K1": k1, "K2": k2, "HAS_ORDER": job.has_order,
                "BT": bm, "BK1": job.bk1, "BK2": job.bk2, "DOT_PREC": "ieee"}
        return domain_gram._segment_outer_kernel, args, {"HAS_ORDER", "BT", "BK1", "BK2", "DOT_PREC"}
    if job.kernel == "_scale_kernel":
        args = {"x_ptr": Ptr(dt), "n": s["n_scale"], "s_ptr": Ptr("fp32"), "BLOCK": bm}
        return fused_linear_ce._scale_kernel, args, {"BLOCK"}
    raise ValueError(f"unknown kernel {job.kernel!r}")


# ----------------------------------------------------------------------------------------------
# What the launchers can choose
# ----------------------------------------------------------------------------------------------
def _pow2_buckets(hi: int) -> list[int]:
    out, b = [], 16
    while b < hi * 2 and b <= lc.next_pow2(hi, 16):
        out.append(b)
        b *= 2
    return out


def _variants(target: int, full_target: int, default: bool = False) -> tuple[str, ...]:
    """aligned everywhere; on the full target also unaligned, and gpt2 for the default buckets."""
    if target != full_target:
        return ("aligned",)
    return ("aligned", "unaligned", "gpt2") if default else ("aligned", "unaligned")


def segment_pairs(extremes_only: bool = False) -> list[tuple[int, int]]:
    """The (BK1, BK2) bucket pairs compiled for segment_outer. Its configuration depends on BK1·BK2 (the fp32
    accumulator) only, so each product class is sampled at its two most skewed pairs (largest BK1 + BK2: the
    largest operand tiles, hence the most shared memory and operand registers), plus the default pairs. k1 goes up
    to the largest max_k1 of any dtype (the reduction runs on whatever u the head produced)."""
    k1_hi = max(lc.max_k1(d) for d in DTYPES)
    every = [(b1, b2) for b1 in _pow2_buckets(k1_hi) for b2 in _pow2_buckets(lc.MAX_K2) if b1 * b2 <= lc.MAX_K1K2]
    out = set() if extremes_only else {(b1, b2) for b1 in lc.DEFAULT_K1 for b2 in lc.DEFAULT_K2}
    for p in {a * b for a, b in every}:
        cls = [x for x in every if x[0] * x[1] == p]
        out.add(max(cls))
        out.add(min(cls))
    return sorted(out)


#: On the targets other than FULL_TARGET these are compiled through a proxy with the same shared memory (checked
#: on FULL_TARGET by tests/test_kernels_compile.py): fp16 through bf16 (same element size); the vocab-parallel
#: _ce_shard_delta_kernel through _ce_delta_proj_kernel (the same δ sweep, aligned sizes); segment_outer with a row
#: order through the one without (contiguous rows are pipelined: the most shared memory).
def _proxied(kernel: str, dtype: str, has_proj: bool, has_order: bool) -> bool:
    return (dtype == "fp16" or (kernel == "_ce_shard_delta_kernel" and has_proj)
            or (kernel == "_segment_outer_kernel" and has_order))


def launch_jobs(targets=tuple(TARGETS), full_target: int = FULL_TARGET) -> list[Job]:
    """Every configuration the launchers can choose, for ``targets`` (see the module docstring)."""
    jobs: list[Job] = []

    def add(job: Job):
        if job.target == full_target or job.role == "refused" or \
                not _proxied(job.kernel, job.dtype, job.has_proj, job.has_order):
            jobs.append(job)

    for cap in targets:
        for dt in DTYPES:
            # no projection: the CE kernels with HAS_PROJ=False (u_method gemm / augmented / tiled, and every
            # pass A) and the vocab-parallel statistics kernel; the backward's scale kernel (bf16 / fp16 only:
            # fp32 tensors are scaled by torch)
            for var in _variants(cap, full_target):
                cfg = tuple(lc.ce_pass(_SIZES[var]["C"], dt, None, interpret=False))
                for kern in ("_ce_delta_proj_kernel", "_ce_shard_delta_kernel", "_ce_shard_stats_kernel"):
                    add(Job(kern, dt, None, None, var, cfg, cap))
                if dt != "fp32" and hasattr(lc, "scale"):
                    add(Job("_scale_kernel", dt, None, None, var, tuple(lc.scale(dt, interpret=False)), cap))
            for bk1 in _pow2_buckets(lc.max_k1(dt)):
                for var in _variants(cap, full_target, default=bk1 in lc.DEFAULT_K1):
                    S = _SIZES[var]
                    k1 = _example_k(bk1, var)       # max_k1 is a bucket (a power of two): k1 <= max_k1
                    cfg = tuple(lc.ce_pass(S["C"], dt, k1, interpret=False))
                    for kern in ("_ce_delta_proj_kernel", "_ce_shard_delta_kernel"):
                        add(Job(kern, dt, bk1, None, var, cfg, cap, has_proj=True))
                    cfg = tuple(lc.proj_u(S["C"], S["V"], dt, k1, interpret=False))
                    add(Job("_proj_u_kernel", dt, bk1, None, var, cfg, cap, has_proj=True))
        for bk1, bk2 in segment_pairs():   # not on the training path: aligned only; the default pairs on sm_90
            if cap != full_target and (bk1, bk2) not in segment_pairs(extremes_only=True):
                continue
            cfg = tuple(lc.segment_outer(bk1, bk2, interpret=False))
            for order in (True, False):
                add(Job("_segment_outer_kernel", "fp32", bk1, bk2, "aligned", cfg, cap, has_order=order))
        # the first k1 above the limit, at the smallest tile the policy allows (the number validate() quotes), on
        # the A100: the smallest limit, which is the one a refused k1 must exceed
        if cap == min(lc.SHARED_MEMORY_LIMITS, key=lc.SHARED_MEMORY_LIMITS.get):
            for dt in DTYPES:
                for kern, cfg, _ in lc.REFUSED[dt]:
                    add(Job(kern, dt, 2 * lc.max_k1(dt), None, "aligned", tuple(cfg), cap, has_proj=True,
                            role="refused"))
    return jobs


def is_default(r: dict) -> bool:
    """The configurations the shipped configs and the defaults run: no projection (any V), the scale kernel, and
    k1 = 32 or 64 exactly (the aligned and gpt2 variants of those buckets; k2 16 / 32 / 64 for segment_outer)."""
    if r["kernel"] == "_scale_kernel" or (r["kernel"] != "_segment_outer_kernel" and not r["has_proj"]):
        return True
    if r["variant"] == "unaligned" or r["bk1"] not in lc.DEFAULT_K1:
        return False
    return r["kernel"] != "_segment_outer_kernel" or r["bk2"] in lc.DEFAULT_K2


def spill_budget(r: dict) -> int:
    return lc.DEFAULT_SPILL_BUDGET if is_default(r) else lc.SPILL_BUDGET


# ----------------------------------------------------------------------------------------------
# --search: the candidate jobs of each family (the search itself is compile_gate.search)
# ----------------------------------------------------------------------------------------------
def _search_families():
    """(family, dtype, bucket) -> the kernels that must all accept one configuration, and its candidates, in order
    of preference. See launch_configs for the policy."""
    fams = {}
    for dt in DTYPES:
        for bk1 in [16 * 2**i for i in range(8)]:                        # up to 2048
            fams[("ce", dt, bk1)] = (("_ce_delta_proj_kernel", "_ce_shard_delta_kernel"), lc.ce_candidates(bk1))
            fams[("proj_u", dt, bk1)] = (("_proj_u_kernel",), lc.proj_u_candidates(bk1))
    for p in [256 * 2**i for i in range(8)]:                              # BK1·BK2 up to 32768
        fams[("segment_outer", "fp32", p)] = (("_segment_outer_kernel",), lc.segment_outer_candidates())
    return fams


def _family_jobs(fam, kernels, cfg, targets, full_target) -> list[Job]:
    kind, dt, b = fam
    jobs = []
    for cap in targets:
        if kind == "segment_outer":
            for var in _variants(cap, full_target):
                for bk1 in _pow2_buckets(1024):
                    bk2 = b // bk1
                    if 16 <= bk2 <= lc.MAX_K2:
                        jobs.append(Job(kernels[0], dt, bk1, bk2, var, cfg, cap, has_order=True, role="candidate"))
        else:
            for var in _variants(cap, full_target, default=b in lc.DEFAULT_K1):
                for kern in kernels:
                    jobs.append(Job(kern, dt, b, None, var, cfg, cap, has_proj=True, role="candidate"))
    return jobs


def _estimate_ok(fam, cfg) -> bool:
    """Skip candidates that cannot fit or would keep more than 128 fp32 accumulators per thread (certain to spill,
    and slow to compile): operand tiles x max(stages - 1, 1) buffers against the largest limit."""
    kind, dt, b = fam
    bm, bv, w, s = cfg
    bufs = max((s or 3) - 1, 1)
    e = _ESIZE[dt]
    if kind == "ce":
        tiles, acc = (bv * b + bm * bv) * e, bm * b
    elif kind == "proj_u":
        tiles, acc = (bv * b + bm * bv) * e, bm * b
    else:
        tiles, acc = bm * (b // 16 + 16) * 4, b       # the most skewed pair (BK1 + BK2 largest)
    return tiles * bufs <= max(lc.SHARED_MEMORY_LIMITS.values()) and acc / (32 * w) <= 128

