"""``torch.compile(model, backend="ats", options={...})``: the ATS rewrite as a Dynamo backend.

Dynamo hands us the graph it captured, with the module's parameters and buffers lifted to graph
inputs. We put those back as attributes (so the graph is a model again, with one image input),
run the same capture-match-rewrite pipeline as :func:`ats_fx.transform` on that graph, and pass
the result to Inductor (or to the backend named in ``options["backend"]``). The ATS node reaches
Inductor as the ``ats_fx::sample_tokens`` custom op: opaque, with a static output width for
``padding="static"`` and an unbacked SymInt for ``"batch_max"``.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``backend="ats"`` works after ``pip install`` without importing ats_fx, and by ``import ats_fx``
(``register``), so it also works from a source tree that was never installed.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .config import make_options
from .errors import ATSConfigError, ATSUnsupportedModel

log = logging.getLogger(__name__)

TRANSFORM_KEYS = ("stages", "ratio", "k", "score", "padding", "kernels", "token_output")
# torch.compile refuses mode= together with options=, so the Inductor mode can ride in options.
BACKEND_KEYS = ("backend", "mode", "inductor_options", "patch_gemm", "cuda_graphs")


def _size_source(node: fx.Node, tensors: list[fx.Node]) -> Optional[tuple[fx.Node, int]]:
    """The (tensor placeholder, dim) whose size a SymInt placeholder (Dynamo's dynamic batch) is."""
    sym = node.meta.get("example_value")
    if not isinstance(sym, torch.SymInt):
        return None
    for t in tensors:
        val = t.meta.get("example_value")
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt) and str(size.node.expr) == str(sym.node.expr):
                return t, d
    return None


SIZE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full", "repeat"}
SIZE_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.randn, torch.rand}


def generalize_batch(graph: fx.Graph, data: fx.Node, batch: int) -> int:
    """Dynamo traced a static batch, so sizes such as ``x.reshape(B, N, 3, H, d)`` hold B as a literal.
    Replace a leading size literal equal to B with ``data.size(0)`` wherever the result's first dim is
    the batch. Export then checks that no specialisation is left (else we compile without ATS)."""
    size_node = None
    changed = 0
    for node in list(graph.nodes):
        is_size_call = (node.op == "call_method" and node.target in SIZE_METHODS) or (
            node.op == "call_function" and node.target in SIZE_FUNCTIONS
        )
        val = node.meta.get("example_value")
        if not is_size_call or not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[0] != batch:
            continue
        args = list(node.args)
        first = 1 if node.op == "call_method" or node.target is torch.reshape else 0
        if first >= len(args):
            continue
        if isinstance(args[first], (tuple, list)) and args[first] and args[first][0] == batch:
            target, inner = args[first], True
        elif isinstance(args[first], int) and not isinstance(args[first], bool) and args[first] == batch:
            target, inner = None, False
        else:
            continue
        if size_node is None:
            with graph.inserting_after(data):
                size_node = graph.call_method("size", (data, 0))
        if inner:
            args[first] = type(target)([size_node, *target[1:]])
        else:
            args[first] = size_node
        node.args = tuple(args)
        changed += 1
    return changed


def freeze(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Dynamo's graph as a model again: lifted parameters/buffers become attributes and SymInt
    inputs (a dynamic batch) become ``x.size(d)``. Returns the new module and the positions of
    the remaining (tensor data) inputs in Dynamo's argument list."""
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    data_idx, tensors = [], []
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(x, torch.Tensor) and (
            isinstance(x, nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name
        ):
            name = f"ats_w{i}"
            if isinstance(x, nn.Parameter):
                out.register_parameter(name, x)
            else:
                out.register_buffer(name, x)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        elif isinstance(x, torch.Tensor):
            data_idx.append(i)
            tensors.append(node)
    for node, x in zip(placeholders, example_inputs):
        if node.graph is graph and node in graph.nodes and not isinstance(x, torch.Tensor):
            source = _size_source(node, tensors)
            if source is None:
                raise ATSUnsupportedModel(f"graph input {node.name} is not a tensor nor a tensor's size")
            with graph.inserting_after(source[0]):
                size = graph.call_function(torch.ops.aten.sym_size.int, source)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
    if len(tensors) == 1:
        val = tensors[0].meta.get("example_value")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and not isinstance(val.shape[0], torch.SymInt):
            generalize_batch(graph, tensors[0], int(val.shape[0]))
    graph.lint()
    out.recompile()
    return out, data_idx


def _rebind(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, name = name.split(".")
    for part in path:
        module = getattr(module, part, None)
        if module is None:
            return
    if name in module._parameters:
        module._parameters[name] = value
    elif name in module._buffers:
        module._buffers[name] = value


# Inductor inlines a pointwise result that several kernels read (a ViT's residual sum) into each of
# them until it has more than 4 reads; the residual stream of a ViT is then re-read (and, after a
# stage, re-gathered) by several kernels. Realizing it once was 8% faster for dense DeiT-S and
# 7-10% for ATS DeiT-S at batch 256 on an H100 (docs/performance.md).
#
# Inductor also launches each pointwise kernel's two candidate configs once on its first call and
# keeps the faster (1-D kernels: a 1024-wide block of 4 warps, 16-byte loads, or a 512-wide block of
# 8 warps). ATS gives every stage its own kernels (each stage a new token width), so a model makes
# nine such picks where the dense model makes one, and the picks did not match in-graph speed: in
# a trace three of nine ATS GELU kernels ran at 1.9 TB/s, the other six at 2.5-2.6, and
# a first call at batch 256 instead of 1 did not help (docs/performance.md). With the first
# config always (``triton.autotune_pointwise=False``), ATS DeiT-S ran 2.1% faster at batch 256 and
# dense the same (H200, docs/performance.md).
DEFAULT_INDUCTOR_OPTIONS = {"realize_reads_threshold": 1, "triton.autotune_pointwise": False}


def _has_option(config, key: str) -> bool:
    """Whether this torch's Inductor config has ``key`` (dotted for nested ones: "triton.x")."""
    *parents, name = key.split(".")
    for part in parents:
        config = getattr(config, part, None)
        if config is None:
            return False
    return hasattr(config, name)


# mode="max-autotune" replays CUDA graphs, but Inductor times each GEMM choice by launching it in a
# loop, host dispatch included. cuBLAS(Lt) does more host work per call than a Triton launch, so its
# timings came out 1.5-8x what it takes in the graph, the more the shorter the GEMM (DeiT-S at batch 256:
# 36 of the ATS model's GEMMs went to Triton templates that then ran 15-35% slower than cuBLAS at the
# same place under reduce-overhead, and the model 9.5% slower; busy CPUs make it worse:
# docs/performance.md). Where this torch can time choices as
# CUDA-graph replays, backend='ats' asks for it in the CUDA-graph mode only.
CUDA_GRAPH_AUTOTUNE_OPTIONS = {"autotune_cudagraph_benchmarking": True}

# max-autotune with Inductor's compile worker pool on compiled each GEMM template again, one after
# another, at its first timed call (ptxas in the benchmarking process): 6-45 s a GEMM shape in a DeiT-S
# compile against 0.7 s tuned alone, ~15 min a cold ATS compile. With the pool off (compile_threads=1,
# precompiling still in 16 threads) a shape takes 3-5 s and the cold compile ~3.5 min (H200, torch 2.11:
# ATS DeiT-S at batch 256 191 s, ViT-B/16 at 64 208 s; same GEMM picks, all cuBLAS; docs/performance.md).
MAX_AUTOTUNE_OPTIONS = {"compile_threads": 1}


def inductor_patches(mode: Optional[str], inductor_options: Optional[dict] = None) -> dict:
    """The Inductor config patches backend='ats' compiles with: the mode's, then
    ``DEFAULT_INDUCTOR_OPTIONS`` (where this torch has them; under the max-autotune modes also
    ``MAX_AUTOTUNE_OPTIONS``, and under ``mode="max-autotune"`` ``CUDA_GRAPH_AUTOTUNE_OPTIONS``), then
    the user's ``inductor_options``. Unless the user sets ``post_grad_custom_post_pass``, it is
    ``cache_key.SourceKey``: Inductor's caches then never serve a compile made by another ats_fx."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    from .cache_key import SourceKey

    patches = dict(list_mode_options(mode)) if mode else {}
    defaults = {**DEFAULT_INDUCTOR_OPTIONS, "post_grad_custom_post_pass": SourceKey()}
    if mode and mode.startswith("max-autotune"):
        defaults.update(MAX_AUTOTUNE_OPTIONS)
    if mode == "max-autotune":
        defaults.update(CUDA_GRAPH_AUTOTUNE_OPTIONS)
    patches.update({k: v for k, v in defaults.items() if _has_option(inductor_config, k)})
    patches.update(inductor_options or {})
    return patches


def cuda_graph_autotune_missing(mode: Optional[str], inductor_options: Optional[dict] = None) -> list[str]:
    """The ``CUDA_GRAPH_AUTOTUNE_OPTIONS`` that ``mode`` wants and this torch's Inductor lacks (the user
    did not set them either): under max-autotune its GEMM picks then favour Triton templates."""
    if mode != "max-autotune":
        return []
    patches = inductor_patches(mode, inductor_options)
    return [k for k in CUDA_GRAPH_AUTOTUNE_OPTIONS if k not in patches]


def _inner_compiler(name: str, mode: Optional[str], inductor_options: Optional[dict]) -> Callable:
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = inductor_patches(mode, inductor_options)
        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)
    if name == "eager":
        return lambda gm, inputs: gm.forward
    from torch._dynamo import lookup_backend

    return lookup_backend(name)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def parse_options(options: Optional[dict]) -> tuple[dict, str, Optional[dict], Optional[str]]:
    """Split and validate ``options``: transform keywords, inner backend, Inductor options, mode."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(TRANSFORM_KEYS) - set(BACKEND_KEYS))
    if unknown:
        raise ATSConfigError(
            f"unknown option(s) {unknown} for backend='ats'; known: {list(TRANSFORM_KEYS + BACKEND_KEYS)}"
        )
    if "stages" not in options:
        raise ATSConfigError("backend='ats' needs options={'stages': ...}, e.g. {'stages': '3-11', 'ratio': 0.87}")
    backend = options.pop("backend", "inductor")
    if not isinstance(options.pop("patch_gemm", True), bool):
        raise ATSConfigError("patch_gemm must be True (patch-embedding conv as one GEMM, the default) or False")
    if not isinstance(options.pop("cuda_graphs", True), bool):
        raise ATSConfigError("cuda_graphs must be True (CUDA graphs on CUDA when no mode is given, the default) "
                             "or False")
    inductor_options = options.pop("inductor_options", None)
    mode = options.pop("mode", None)
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ATSConfigError(f"mode={mode!r}: use one of torch.compile's modes, e.g. 'reduce-overhead'")
    # Static padding by default in every mode: the same logits as batch_max, with no host read per
    # stage and no data-dependent shapes. Under mode default (H200, batch 256, rho=0.87) static ran
    # DeiT-S at 0.74-0.92x dense against 0.55-0.62x with batch_max, and ViT-B/16 at 1.51x batch_max's
    # throughput (docs/performance.md).
    options.setdefault("padding", "static")
    if mode in CUDA_GRAPH_MODES and options["padding"] != "static":
        # CUDA graphs need fixed shapes: batch_max's width is data-dependent (and read on the host).
        raise ATSConfigError(
            f"mode={mode!r} records CUDA graphs, which need fixed shapes; padding='batch_max' has a "
            "data-dependent width. Use padding='static' (the default: same logits)"
        )
    # Validate now, before Dynamo traces anything, so option errors read as option errors.
    make_options(options["stages"], options.get("ratio"), options.get("k"), options.get("score", "attn_vnorm"),
                 options["padding"], options.get("kernels", "auto"), token_output=options.get("token_output", "full"))

    return options, backend, inductor_options, None if mode == "default" else mode


def ats_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None,
                mode: Optional[str] = None) -> Callable:
    """Dynamo backend: rewrite the captured graph with ATS, then compile it with the inner backend."""
    from . import ops
    from .api import transform

    transform_kw, backend, inductor_options, options_mode = parse_options(options)
    _refuse_fake_inputs(example_inputs)
    graphed = _default_cuda_graphs(options, options_mode or mode, backend, example_inputs)
    if graphed:
        options_mode = "reduce-overhead"
    inner = _inner_compiler(backend, options_mode or mode, inductor_options)
    try:
        frozen, data_idx = freeze(gm, example_inputs)
        data = [example_inputs[i] for i in data_idx]
        # torch.export must not see Dynamo's tracing context (its shape environment and guards).
        with torch._guards.tracing(None):
            # ATS never shrinks the patch embedding: run it as one GEMM (passes/patchify.py).
            ats = transform(frozen, example_inputs=tuple(data), check_inputs=False,
                            patch_gemm=(options or {}).get("patch_gemm", True), **transform_kw)
    except ATSUnsupportedModel as err:
        warnings.warn(f"backend='ats': graph compiled without ATS: {err}", stacklevel=2)
        return inner(gm, list(example_inputs))
    # transform() works on a copy; bind the compiled graph to the live parameters and buffers so
    # that training updates and gradients reach the user's model.
    for name, value in list(frozen.named_parameters()) + list(frozen.named_buffers()):
        _rebind(ats, name, value)
    for m in ats.modules():
        if isinstance(m, ops.ATSStage):
            m.compiled = True
    # The rewritten graph is still Dynamo's graph: say so (as torch asks of graph passes that
    # rebuild it, e.g. DDPOptimizer). AOTAutograd then marks the parameters and buffers static
    # inputs, so CUDA graphs read them in place instead of copying every weight on every replay
    # (measured: 56 us per DeiT-S forward on H100, more than a whole stage at batch 1).
    if "dynamo_compile_id" in gm.meta:
        ats.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
    log.info("backend='ats': rewrote a graph of %d nodes; compiling with %s", len(gm.graph.nodes), backend)
    stages = sum(isinstance(m, ops.ATSStage) for m in ats.modules())
    if (options_mode or mode or "").startswith("max-autotune") and backend == "inductor" and stages > 1:
        # Each stage gives the token axis a new width, so every GEMM after it is a new shape to tune.
        log.warning(
            "backend='ats' with mode=%r: %d stages give ~%d new GEMM shapes to autotune; the first compile "
            "takes minutes (DeiT-S, 9 stages, static batch 256, H200, torch 2.11: ~3.5 min with the worker pool "
            "off, as backend='ats' sets it; ~15 min with it on). Measured there, it ran no faster than "
            "mode='reduce-overhead' (rho=0.87: 1.37x dense at batch 256 against 1.39x, 1.02x at batch 1 against "
            "1.01x). One stage, or mode='reduce-overhead', compiles in seconds.", options_mode or mode, stages,
            4 * stages)
    if backend == "inductor" and stages and cuda_graph_autotune_missing(options_mode or mode, inductor_options):
        log.warning(
            "backend='ats' with mode='max-autotune': this torch's Inductor cannot time GEMM choices as CUDA-graph "
            "replays (no autotune_cudagraph_benchmarking), so it counts cuBLAS's host dispatch and picks Triton "
            "templates that run slower in the graph (ATS DeiT-S at batch 256, H200, torch 2.11: 9.5% slower than "
            "mode='reduce-overhead'). Prefer mode='reduce-overhead', or a torch that has the option.")
    # batch_max gives the ATS op a data-dependent output width: let this compile's shape
    # environment allocate it (Dynamo leaves that off unless capture_dynamic_output_shape_ops).
    fake_mode = torch._guards.detect_fake_mode()
    env = fake_mode.shape_env if fake_mode is not None else None
    if env is not None and not env.allow_dynamic_output_shape_ops:
        env.settings = dataclasses.replace(env.settings, allow_dynamic_output_shape_ops=True)
    kept = _flatten_kept_outputs(ats)
    compiled = inner(ats, data)
    # The graph holds the weights it was compiled with (freeze), so it serves those tensors only.
    # Dynamo checks that before the call (_guard_weights): another instance of the model class, or a
    # replaced parameter, then compiles a graph of its own. Where it cannot, each call checks
    # (one identity test per weight, about 3 us for DeiT-S's 152 on a slow host).
    taken = set(data_idx)
    bound_idx = [i for i, x in enumerate(example_inputs) if i not in taken and isinstance(x, torch.Tensor)]
    check = bool(bound_idx) and not _guard_weights(gm, example_inputs, bound_idx)
    bound = [(i, example_inputs[i]) for i in bound_idx] if check else []

    def run(*args):
        if check and not all(args[i] is weight for i, weight in bound):
            raise _other_weights()
        out = compiled(*[args[i] for i in data_idx])
        if graphed:  # the next replay rewrites the graph's outputs: the caller keeps copies
            out = [t.clone() if isinstance(t, torch.Tensor) else t for t in out]
        if not kept:
            return out
        # Dynamo's code after the graph passes each output on as an object: the slot of a token
        # sequence can hold the KeptTokens the compiled graph returned as three tensors.
        out, n = list(out), len(out) - 2 * len(kept)
        for j, slot in enumerate(kept):
            out[slot] = ops.KeptTokens(out[slot], out[n + 2 * j], out[n + 2 * j + 1])
        return out[:n]

    return run


def _refuse_fake_inputs(example_inputs: Sequence[Any]) -> None:
    """Dynamo hands a backend the real inputs; DDPOptimizer (a compiled DistributedDataParallel
    model) hands it each gradient bucket's piece of the graph with fake ones. ATS needs the whole
    forward graph and real weights, so say how to give it that instead of failing deep in capture."""
    from torch._subclasses.fake_tensor import is_fake

    if any(isinstance(x, torch.Tensor) and is_fake(x) for x in example_inputs):
        raise ATSConfigError(
            "backend='ats' was handed fake inputs, which Dynamo's DDPOptimizer does when it compiles a "
            "DistributedDataParallel model bucket by bucket; ATS needs the whole forward graph. Set "
            "torch._dynamo.config.optimize_ddp = False before compiling (DDP's all-reduce then waits for "
            "the compiled backward pass instead of overlapping it).")


def _guard_weights(gm: fx.GraphModule, example_inputs: Sequence[Any], bound_idx: list[int]) -> bool:
    """Make Dynamo's guards of this graph check that each weight in ``bound_idx`` is the very tensor
    compiled in (an identity guard on its source, e.g. ``L['self']._modules['head']._parameters['weight']``).
    Dynamo otherwise reuses the graph for every instance of the model class, and for a model whose
    parameter was replaced by a new tensor. With the guard, those fail it and Dynamo compiles again,
    so each gets a graph of its own weights. The compiled graph keeps its weights alive, so no other
    object can take one's id. False where a weight has no source (the backend called outside Dynamo):
    the caller then checks each call itself."""
    from torch._guards import TracingContext

    try:
        from torch._dynamo.guards import GuardBuilder, install_guard
    except ImportError:  # pragma: no cover - a torch without them
        return False
    if TracingContext.try_get() is None:
        return False
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    guards = []
    for i in bound_idx:
        arg = placeholders[i].meta.get("grapharg") if i < len(placeholders) else None
        source = getattr(arg, "source", None)
        try:
            same = arg is not None and arg.example is example_inputs[i]
        except Exception:  # the example is held weakly and may be gone
            same = False
        if source is None or not same:
            return False
        guards.append(source.make_guard(GuardBuilder.ID_MATCH))
    install_guard(*guards)
    return True


def _other_weights() -> ATSConfigError:
    return ATSConfigError(
        "backend='ats': this call's weights are not the tensors its graph was compiled with, and the graph holds "
        "its weights (it was called outside torch.compile, where no guard could say so). Compile again for these "
        "weights (torch.compile(model, backend='ats', options={...})), or change weights in place "
        "(model.load_state_dict) instead of assigning new tensors.")


def _default_cuda_graphs(options: Optional[dict], mode: Optional[str], backend: str, inputs: Sequence[Any]) -> bool:
    """No mode given, Inductor, CUDA inputs and ``cuda_graphs`` not turned off: compile as
    ``mode="reduce-overhead"`` (CUDA graphs), returning copies of the outputs. Without graphs every
    stage's launches cost host time that small batches never win back (H200, DeiT-S rho=0.87, no mode:
    0.36x plain torch.compile at batch 1; docs/performance.md)."""
    if mode is not None or backend != "inductor" or not (options or {}).get("cuda_graphs", True):
        return False
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)


def _flatten_kept_outputs(gm: fx.GraphModule) -> list[int]:
    """token_output="kept": the graph returns tensors only (what Inductor compiles). Each KeptTokens
    output keeps its tokens in its slot; positions and mask go after the other outputs. Returns the slots."""
    from . import ops

    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    slots, extra = [], []
    with gm.graph.inserting_before(out):
        for i, v in enumerate(values):
            if isinstance(v, fx.Node) and v.target is ops.kept_output:
                parts = [gm.graph.call_function(operator.getitem, (v, j)) for j in range(3)]
                values[i] = parts[0]
                extra += parts[1:]
                slots.append(i)
    if slots:
        out.args = (tuple(values + extra),)
        info = getattr(gm.graph._codegen, "pytree_info", None)  # export's graphs unflatten their outputs
        if info is not None and info.out_spec is not None:
            gm.graph._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure(out.args[0]))
        gm.recompile()
    return slots


def register() -> None:
    """Register ``ats_backend`` as Dynamo's ``"ats"`` (``import ats_fx`` calls this)."""
    from torch._dynamo.backends.registry import register_backend

    try:
        register_backend(compiler_fn=ats_backend, name="ats")
    except AssertionError:  # already registered: the entry point was loaded first
        pass
