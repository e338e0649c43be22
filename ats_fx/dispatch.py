"""Where every ATS stage and operator decides how it runs: PyTorch reference, Triton kernels, or the
overlapped two-stream stage. Imports only ``errors`` (and ``kernels`` inside a function), so
``library``, ``overlap`` and ``ops`` can all ask it without importing each other.

A stage takes one of five paths (``stage_path``):

- ``"weights"``: the attention matrix is materialised and scored from its rows (talking heads,
  CaiT; stages without a class token off the Triton path). PyTorch, with autograd.
- ``"received"``: a stage without a class token on the Triton path: two kernels score each token by
  the attention it receives without materialising the matrix (``kernels/received.py``), then the
  kept rows are sampled and attended as on the sampled path.
- ``"baseline"``: the paper's top-K / random baselines (eager ablations).
- ``"overlapped"``: a small static batch at inference on CUDA: sampling on a side stream beside every
  row's attention (``overlap.py``).
- ``"sampled"``: score, sample, then attend the kept rows. Each op then picks its kernel with
  ``use_triton``: the Triton kernels on CUDA at inference, the reference elsewhere.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

from .errors import ATSInputError

# Overlapped stage policy. "auto": on CUDA when batch x heads is at most SM_SHARE of the GPU's SMs;
# "on": always, also off CUDA (the tests run it under Triton's interpreter); "off": never.
OVERLAP = "auto"
# H200 (132 SMs): the overlapped stage was 3-12% faster than the sequential one at every masked stage
# shape up to B x H = 96 (ViT-B to batch 8, DeiT-S to 16), mixed at 192 and slower past it
# (docs/performance.md, "Small batches"). Whole models at batch 8 on the H100 (B x H = 48 and 96,
# reduce-overhead): DeiT-S 1.213x overlapped against 1.226x sequential, ViT-B 1.344x against 1.340x.
SM_SHARE = 0.75
# Overlap the first stage too (no key mask yet). Its full attention must be the Triton kernel's: with
# cuDNN's flash attention beside the sampling that stage ran 7-30% slower than sequentially. Against
# overlapping the masked stages only it is a tie: DeiT-S 1.207x with it and 1.214x without, ViT-B
# 1.276x and 1.279x (H100, reduce-overhead, batch 1, rho=0.87, each arm compiled on its own;
# docs/performance.md, "Small batches"). An earlier 0.2-0.3% gain came from an A/B whose arms
# shared one compiled graph.
UNMASKED = True

# padding="auto" (transform's default) pads statically from this batch up, on CUDA in eager. Static
# padding runs K + p rows with no host read; batch_max reads the batch's widest K' back to the host
# every stage, which stalls the GPU's queue. H200, fp16, DeiT-S eager: at batch 256 static ran 1.25x
# dense against batch_max's 0.92x at rho=0.87 (1.31x against 1.28x at K=108); at 64 and below the two
# split by point, and both are host-bound there (docs/performance.md, "Padding").
AUTO_STATIC_BATCH = 128

# Stages without a class token on the Triton path score with kernels/received.py ("received") instead of
# materialising the attention matrix ("weights"). Chosen on memory traffic, not yet timed on a GPU: at
# batch 256 a ViT-B stage's matrix is 238 MB in fp16, which the PyTorch path writes and reads about ten
# times (logits, softmax, the float32 copy, |A|, the mean, the kept rows), against two QKᵀ passes
# that keep it in registers. The switch lets benchmarks time both (benchmarks/variants.py).
RECEIVED = True

_reference_only = 0  # > 0 inside ``reference_kernels()``
_static_padding = 0  # > 0 inside ``static_padding()``: a CUDA graph capture (graphs.py)


def triton_available() -> bool:
    """Triton can be imported (it ships with torch on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run every ATS op on its PyTorch reference inside this block, whatever ``kernels`` says.
    ``transform`` validates the rewritten graph this way on the example input, so a CPU model
    transformed with ``kernels="triton"`` (to be moved to the GPU afterwards) validates too."""
    global _reference_only
    _reference_only += 1
    try:
        yield
    finally:
        _reference_only -= 1


def use_triton(x: Tensor, kernels: str) -> bool:
    """``kernels="auto"``: Triton on CUDA for float32/16/bf16; the reference elsewhere. Never under
    ``torch.export``, where ``packaged`` decides: an exported model must run without ats_fx."""
    if kernels == "reference" or _reference_only or torch.compiler.is_exporting():
        return False
    if kernels == "triton":
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ATSInputError(
                "kernels='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the "
                "CPU, slowly); use kernels='auto' to fall back to the PyTorch reference"
            )
        return True
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_available()


def packaged(x: Tensor, kernels: str) -> bool:
    """Under ``torch.export``, the Triton kernels as ``triton_op``s (``packaged_ops.py``), which
    AOTInductor compiles into the package: for CUDA tensors of float32/16/bf16 unless
    ``kernels="reference"``. Elsewhere an exported model holds the reference's aten ops. Either
    way the package runs in a process that never imports ats_fx. The callers add the rest: static
    padding and no dropout. Not whether a gradient is wanted: ``torch.export`` traces with autograd
    on and parameters that require grad, and what it exports is served, not trained. The ops have no
    backward, so a backward through the exported program raises; export with ``kernels="reference"``
    to train it."""
    return (torch.compiler.is_exporting() and kernels != "reference" and not _reference_only and x.is_cuda
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_available())


def needs_grad(*xs: Tensor) -> bool:
    """Autograd will want a gradient through one of ``xs`` (the Triton kernels have no backward)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def tracing(x: Tensor) -> bool:
    """True under Dynamo, export or any tracing/dispatch mode: then the registered op must be called.
    Plain eager calls skip the dispatcher's custom-op overhead (tens of microseconds per call)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or type(x) is not Tensor


def overlap_pays(q: Tensor) -> bool:
    """``OVERLAP`` allows the overlapped stage for ``q`` (B, H, T, dh) of static shape: on CUDA the
    batch must be small enough that the two branches run side by side (``SM_SHARE``)."""
    if OVERLAP == "off" or not all(type(n) is int for n in q.shape):
        return False
    if OVERLAP == "on":
        return True
    if not q.is_cuda:
        return False
    from .kernels.attention_rows import multiprocessors

    return q.shape[0] * q.shape[1] <= SM_SHARE * multiprocessors(q.device)


@contextlib.contextmanager
def sequential_stages() -> Iterator[None]:
    """Every stage sequential inside the block, and without a class token on the matrix it scores
    (``ats_fx.count_flops``: the count is the method's, not a schedule's; an overlapped stage with a
    deferred gather projects every row, the received-attention kernels compute the kept rows' logits
    a second time)."""
    global OVERLAP, RECEIVED
    saved, OVERLAP, RECEIVED = (OVERLAP, RECEIVED), "off", False
    try:
        yield
    finally:
        OVERLAP, RECEIVED = saved


@contextlib.contextmanager
def static_padding() -> Iterator[None]:
    """``padding="auto"`` resolves to static inside the block: a CUDA graph needs fixed shapes."""
    global _static_padding
    _static_padding += 1
    try:
        yield
    finally:
        _static_padding -= 1


def graphs_apply(enabled: bool, training: bool, padding: str, selection: str, inputs: tuple) -> bool:
    """An eager call of an ATS model replays a CUDA graph (``graphs.py``): ``cuda_graphs`` on, eval mode,
    CUDA tensor inputs, stages that may pad statically (``padding`` "auto" or "static"), the ATS
    selection (the baselines read the host), and no tracing or stream capture around the call. With
    autograd on too: the replay is then one autograd node whose backward recomputes the pass
    (``graphs.replay_differentiable``; ``ATSGraphModule.__call__`` chooses between the two)."""
    if not enabled or training or padding == "batch_max" or selection != "ats":
        return False
    if not inputs or not all(type(x) is Tensor and x.is_cuda for x in inputs):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return not (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
                or torch.cuda.is_current_stream_capturing())


def padding_for(padding: str, q: Tensor, static_width: int) -> str:
    """The padding a stage call runs: ``"auto"`` resolves to ``"static"`` when traced (compile, export:
    fixed shapes, no host read) or for a CUDA batch of at least ``AUTO_STATIC_BATCH`` images, unless
    static padding would keep every row (``static_width`` reaches the token count); else ``"batch_max"``."""
    if padding != "auto":
        return padding
    if _static_padding:
        return "static"
    # Compiled or exported (fake or functional tensors), not merely observed: FlopCounterMode is a
    # dispatch mode too, and count_flops must count the rows the method keeps.
    if torch.compiler.is_compiling() or type(q) is not Tensor:
        return "static"
    if q.is_cuda and q.shape[0] >= AUTO_STATIC_BATCH and static_width < q.shape[2]:
        return "static"
    return "batch_max"


def stage_path(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], *, class_token: bool, width: int,
               kernels: str, selection: str, dropout_p: float, bias: Optional[Tensor], mix: Optional[tuple]) -> str:
    """The path of one stage call: ``"weights"``, ``"received"``, ``"baseline"``, ``"overlapped"`` or ``"sampled"``
    (see the module docstring). ``width`` is K + p for static padding, -1 for batch_max."""
    grads = needs_grad(q, k, v) or (bias is not None and needs_grad(bias))
    if mix is not None:
        return "weights"
    if not class_token:
        # The kernels have no backward and no dropout: training materialises the matrix. Exported
        # for CUDA they are packaged (``packaged`` says why a gradient does not count there).
        kernel = (use_triton(q, kernels) and not grads) or packaged(q, kernels)
        if RECEIVED and selection == "ats" and dropout_p == 0.0 and kernel:
            return "received"
        return "weights"
    if selection != "ats":
        return "baseline"
    if ((key_mask is not None or UNMASKED) and width >= 0 and dropout_p == 0.0 and use_triton(q, kernels)
            and not grads and overlap_pays(q)):
        return "overlapped"
    return "sampled"
