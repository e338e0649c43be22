"""The public API: transform a model, read back what ATS kept, count FLOPs."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx import Interpreter
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from . import dispatch, graphs, ops
from .config import PerStage, Stages, make_options
from .errors import ATSConfigError, ATSInputError, ATSUnsupportedModel
from .passes.capture import capture, example_inputs_for
from .passes.defer import defer_stage_gathers
from .passes.fuse import fuse_gather_add
from .passes.match import find_attention
from .passes.patchify import patchify_convs
from .passes.rewrite import Analysis, TokenWalk, remove_replaced
from .passes.validate import output_shapes, validate

log = logging.getLogger(__name__)


class ATSGraphModule(fx.GraphModule):
    """A model rewritten by :func:`transform`. Same parameters and state_dict keys as the
    original; ``kept_tokens(model)`` reads back what the last forward pass kept."""

    def train(self, mode: bool = True):
        super().train(mode)
        captured = getattr(self, "ats_captured_training", mode)
        if mode != captured:
            log.warning(
                "this ATS model was captured in %s mode: dropout and drop-path stay as captured. "
                "Call ats_fx.transform on the model in %s mode instead.",
                "train" if captured else "eval", "train" if mode else "eval",
            )
        return self

    def __call__(self, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)
        if (isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == 0
                and not torch.compiler.is_compiling()):
            return self._empty_batch(args, kwargs)
        cache = self.__dict__.get("_ats_graphs")
        if (cache is not None and not cache.failed and not kwargs and not self._forward_hooks
                and len(self._forward_pre_hooks) == 1  # only the input check, called below
                and dispatch.graphs_apply(self.ats_cuda_graphs, self.training, self.ats_options.padding,
                                          self.ats_options.selection, args)):
            params = [p for p in self.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
            if not params and not any(dispatch.needs_grad(x) for x in args):
                _check_inputs(self, args)
                with torch.no_grad():  # nothing to differentiate: the outputs would not require grad anyway
                    return cache(self.forward, self._stages, list(args))
            if not self.__dict__.get("_ats_backward_seen"):
                _check_inputs(self, args)
                stages = self.__dict__.setdefault("_ats_stage_list", self._stages())
                return graphs.replay_differentiable(cache, self.forward, stages, list(args), params,
                                                    self._after_backward)
        return super().__call__(*args, **kwargs)

    def _after_backward(self, changed: int) -> None:
        """A backward went through a replayed call (graphs.py): this model is being differentiated, so
        its calls with autograd on run eagerly from now on (each replay's backward would recompute the
        forward pass). Say so, and say if the recompute kept other tokens than the replay did."""
        if changed:
            log.warning("ATS model: the backward's eager recompute kept other tokens than the replayed forward "
                        "pass (%s; rounding moved a token across a quantile), so the gradient is the recompute's. "
                        "transform(..., cuda_graphs=False) differentiates the very pass it returns.",
                        "another width" if changed < 0 else f"{changed} positions differ")
        if not self.__dict__.get("_ats_backward_seen"):
            self._ats_backward_seen = True
            log.info("ATS model: a backward went through a replayed CUDA graph; calls with autograd on now run "
                     "eagerly (torch.no_grad() and torch.inference_mode() calls still replay)")

    def _stages(self) -> list:
        return [m for m in self.modules() if isinstance(m, ops.ATSStage)]

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda() move the weights: a captured graph would read the old memory.
        if self.__dict__.get("_ats_graphs") is not None:
            self._ats_graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        if self.__dict__.get("_ats_graphs") is not None:  # assign=True replaces the tensors
            self._ats_graphs.clear()
        return super().load_state_dict(*args, **kwargs)

    def _empty_batch(self, args: tuple, kwargs: dict) -> Any:
        """An empty batch gives empty outputs of the right shapes, as the dense model does: the graph's
        token reshapes cannot infer a size from zero elements, so run one zero image and keep none."""
        def one(t):
            return t.new_zeros((1, *t.shape[1:])) if isinstance(t, torch.Tensor) and t.dim() and not len(t) else t

        out = super().__call__(*pytree.tree_map(one, args), **pytree.tree_map(one, kwargs))
        for stage in self.modules():
            if isinstance(stage, ops.ATSStage) and stage.last is not None:
                t = stage.last
                stage.last = ops.StageTrace(t.layer, t.module, t.positions[:0], t.kept[:0], t.budget[:0], t.width_in,
                                            None if t.mask_in is None else t.mask_in[:0])
        return pytree.tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) and t.dim() else t, out)

    def __deepcopy__(self, memo):
        # GraphModule's deepcopy rebuilds the module from its code: hooks and our own attributes
        # would be lost, and with them the input checks and the capture-mode warning.
        # Captured graphs belong to the original's memory and cannot be copied: the copy starts without.
        cache = self.__dict__.get("_ats_graphs")
        if cache is not None:
            memo[id(cache)] = graphs.GraphCache()  # GraphModule's deepcopy copies the whole __dict__
        result = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if key.startswith("ats_"):
                setattr(result, key, copy.deepcopy(value, memo))
        if cache is not None:
            result._ats_graphs = memo[id(cache)]
        result.register_forward_pre_hook(_check_inputs)
        return result

    def __reduce_ex__(self, protocol):
        # torch.export leaves a guard module in the graph that pickle cannot carry, and unpickling a
        # model runs arbitrary code: ats_fx.save keeps weights and options only.
        raise TypeError(
            "an ATS model cannot be pickled (torch.save(model), pickle.dumps): save it with "
            "ats_fx.save(model, path) and rebuild it with ats_fx.load(path, original_model), which stores "
            "the state_dict and the transform options only"
        )


def _check_inputs(module: ATSGraphModule, args: tuple) -> None:
    for i, (x, want) in enumerate(zip(pytree.tree_leaves(args), module.ats_input_shapes)):
        if not isinstance(x, torch.Tensor) or want is None:
            continue
        if x.dim() == 0 or tuple(x.shape[1:]) != want:
            raise ATSInputError(
                f"input {i} has shape {tuple(x.shape)}, but this ATS model was captured for "
                f"(batch, {', '.join(map(str, want))}). Pass example_inputs= of the shape you will use "
                "to ats_fx.transform."
            )
        if module.ats_check_inputs:
            ops.check_finite(x)


def _assign(module: nn.Module, name: str, value: torch.Tensor, is_param: bool, persistent: bool = True) -> None:
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if not hasattr(module, leaf):
        if is_param:
            module.register_parameter(leaf, value)
        else:
            module.register_buffer(leaf, value, persistent=persistent)


def _neutral_masks(gm: fx.GraphModule, example: tuple, sites) -> Any:
    """Evaluate attention masks once: an all-True boolean or all-zero additive mask is neutral
    (HF builds one from arange even without padding) and can be dropped after ATS."""
    wanted = {s.mask for s in sites if s.mask is not None}
    if not wanted:
        return lambda node: False
    values = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*pytree.tree_leaves(example))

    def from_weights(node: fx.Node) -> bool:
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n.op == "get_attr":
                return True
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
        return False

    def neutral(node: fx.Node) -> bool:
        # A bias read from weights (a relative position bias table) is zero at init only:
        # it is a position bias, never neutral.
        v = values.get(node)
        if not isinstance(v, torch.Tensor) or from_weights(node):
            return False
        return bool(v.all()) if v.dtype == torch.bool else bool((v == 0).all())

    return neutral


def analyse(model: nn.Module, example_inputs: Any = None) -> tuple[fx.GraphModule, Analysis, tuple]:
    """Capture ``model`` and find its attention sites, class token and pooling (no rewrite)."""
    example = example_inputs_for(model, example_inputs)
    gm = capture(model, example)
    sites = find_attention(gm.graph)
    analysis = TokenWalk(gm, sites, no_class_token=declares_no_class_token(model)).run()
    return gm, analysis, example


def declares_no_class_token(model: nn.Module) -> bool:
    """timm says so with ``cls_token = None``: learned tokens in front are then registers, and a
    stage scores with the mean query row instead of the first token's row."""
    return hasattr(model, "cls_token") and getattr(model, "cls_token") is None


def describe_unmatched(unmatched: list) -> str:
    """``unmatched_softmaxes`` grouped by reason: "why (at first.module and N more)"."""
    by_reason: dict = {}
    for module, why in unmatched:
        by_reason.setdefault(why, []).append(module or "top")
    return "; ".join(f"{why} (at {mods[0]}" + (f" and {len(mods) - 1} more)" if len(mods) > 1 else ")")
                     for why, mods in by_reason.items())


def _refuse_if_no_sites(model: nn.Module, analysis: Analysis) -> None:
    name = type(model).__name__
    if not analysis.sites:
        unmatched = describe_unmatched(analysis.unmatched)
        raise ATSUnsupportedModel(
            f"{name}: no attention softmax(Q·Kᵀ·scale)·V found (explicit matmul, "
            "scaled_dot_product_attention or nn.MultiheadAttention); ATS needs a transformer"
            + (f". Softmax attention that no spelling matched: {unmatched}" if unmatched else "")
        )
    if analysis.seed is None and analysis.seed_problem:
        raise ATSUnsupportedModel(f"{name}: {analysis.seed_problem}")
    if not analysis.token_sites:
        reasons = "; ".join(sorted({f"{s.module}: {why}" for s, why in analysis.not_token.items()}))
        late = ""
        if analysis.seed is not None:
            from .passes.graph import module_path

            late = (f". The token sequence starts at {module_path(analysis.seed) or analysis.seed.name}, "
                    "and no attention over the tokens was matched before it (the reasons above), so there is "
                    "no layer to sample in")
        unmatched = describe_unmatched(analysis.unmatched)
        unmatched = f"; softmax attention no spelling matched: {unmatched}" if unmatched else ""
        raise ATSUnsupportedModel(f"{name}: no attention over tokens found ({reasons}{unmatched}){late}")


def _refuse_unconvertible(model: nn.Module) -> None:
    """Models that capture would get wrong: already converted, compiled, or carrying hooks (export
    bakes a hook's effect into the graph once; it would never fire or change again)."""
    if isinstance(model, ATSGraphModule):
        raise ATSConfigError("this model is already an ATS model (made by ats_fx.transform): transform the "
                             "original model instead, with all the stages you want")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ATSConfigError("this model is wrapped by torch.compile: pass the original module "
                             "(compiled._orig_mod), or compile with torch.compile(model, backend='ats', ...)")
    if not isinstance(model, nn.Module):
        raise ATSConfigError(f"ats_fx.transform takes an nn.Module, not {type(model).__name__}")
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
              or getattr(m, "_backward_pre_hooks", None)]
    if hooked:
        more = f" and {len(hooked) - 3} more" if len(hooked) > 3 else ""
        raise ATSUnsupportedModel(
            f"module(s) {', '.join(hooked[:3])}{more} have forward or backward hooks. Capture would bake a hook's "
            "effect into the graph once: a recording hook would never fire, and removing it later would change "
            "nothing. Remove the hooks (handle.remove()) before ats_fx.transform; read what ATS kept with "
            "ats_fx.kept_tokens(model)."
        )


def transform(
    model: nn.Module,
    stages: Stages,
    *,
    ratio: PerStage = None,
    k: PerStage = None,
    score: str = "attn_vnorm",
    padding: str = "auto",
    kernels: str = "auto",
    selection: str = "ats",
    token_output: str = "full",
    cuda_graphs: bool = True,
    patch_gemm: bool = True,
    example_inputs: Any = None,
    check_inputs: bool = True,
) -> ATSGraphModule:
    """Rewrite ``model`` so that the chosen attention layers sample tokens with ATS.

    Args:
        model: a vision transformer (timm, HF transformers, torchvision...), with a class token or
            without one (average pool, registers, attention pooling: stages then score tokens by
            the attention they receive, the mean query row; docs/ats-semantics.md).
            It is not modified; the result has its own copy of the weights with the same
            ``state_dict`` keys.
        stages: attention layers (counted from 0 in execution order) that get ATS: an int,
            an iterable such as ``range(3, 12)``, or a string such as ``"3-11"``.
        ratio: rho in (0, 1]; each stage samples K = max(round(rho * N_in), 8) tokens.
            One value, or one per stage. Defaults to 1.0 when neither ratio nor k is given.
        k: an absolute K (int >= 1) instead of ratio, one value or one per stage.
        score: ``"attn_vnorm"`` (paper eq. 3) or ``"attn"`` (no ‖V‖ factor).
        padding: ``"auto"`` (static when compiled or exported, and in eager for CUDA batches of
            ``dispatch.AUTO_STATIC_BATCH`` images or more; batch_max otherwise), ``"batch_max"``
            (truncate to the batch's largest K'+p; one host read per stage) or ``"static"``
            (always K+p rows: fixed shapes, no host synchronisation for the size).
        kernels: ``"auto"`` (Triton scoring and sampling on CUDA, the PyTorch reference on the
            CPU and for float64), ``"triton"`` (Triton everywhere, also for the kept-row
            attention at inference; on the CPU only under ``TRITON_INTERPRET=1``) or
            ``"reference"`` (PyTorch only).
        selection: ``"ats"`` (inverse-transform sampling, the method). The paper's baselines,
            for ablations and eager only: ``"topk"`` keeps the K highest-scoring tokens,
            ``"random"`` keeps K tokens drawn uniformly (torch's global RNG).
        token_output: what a model that returns its token sequence returns: ``"full"`` (the
            original length; a dropped token holds its value from the layer where it was
            dropped) or ``"kept"`` (:class:`ats_fx.KeptTokens`: the kept tokens, their original
            positions and the padding mask).
        cuda_graphs: an eager call in eval mode on CUDA tensors replays a CUDA graph captured
            once per input shape (static padding; with autograd on, one differentiable replay).
            False runs every call op by op. May be switched later: ``model.ats_cuda_graphs``.
        patch_gemm: run the patch embedding (a conv whose kernel equals its stride) as one GEMM,
            the same math; cuDNN ran it 5-12x slower (``passes/patchify.py``). ATS cannot shrink
            that layer, so its cost caps the speed-up.
        example_inputs: inputs to capture with; by default a random batch of the size the
            model declares (timm ``pretrained_cfg``, HF ``config.image_size``...).
        check_inputs: refuse inputs with NaN/inf at run time.
    Returns:
        An :class:`ATSGraphModule` computing the same function as ATS-NOTES.md describes.
    Raises:
        ATSConfigError: bad options (stage out of range, ratio outside (0, 1], k < 1).
        ATSUnsupportedModel: the model cannot be converted; the message names layer and reason.
    """
    options = make_options(stages, ratio=ratio, k=k, score=score, padding=padding, kernels=kernels,
                           selection=selection, token_output=token_output)
    if not isinstance(patch_gemm, bool):
        raise ATSConfigError(f"patch_gemm={patch_gemm!r}: give True (the patch-embedding conv as one GEMM) or False")
    _refuse_unconvertible(model)
    gm, analysis, example = analyse(model, example_inputs)
    _refuse_if_no_sites(model, analysis)
    n = len(analysis.token_sites)
    bad = [s for s in options.layers if s >= n]
    if bad:
        raise ATSConfigError(
            f"stage(s) {bad} out of range: {type(model).__name__} has {n} attention layers, "
            f"numbered 0-{n - 1}; e.g. stages=range(3, {n})"
        )
    expected = output_shapes(gm)
    plan = {s.layer: s for s in options.stages}
    first = min(options.layers)
    neutral = _neutral_masks(gm, example, analysis.token_sites[first:])
    walk = TokenWalk(gm, analysis.token_sites + analysis.class_attention, plan, options, neutral,
                     no_class_token=declares_no_class_token(model))
    walk.run()
    remove_replaced(gm, walk.replaced)
    fuse_gather_add(gm, options.kernels)
    defer_stage_gathers(gm)
    if patch_gemm:
        patchify_convs(gm)
    result = ATSGraphModule(gm, gm.graph, class_name=f"ATS{type(model).__name__}")
    for name, p in gm.named_parameters():
        _assign(result, name, p, True)
    saved = set(model.state_dict())  # non-persistent buffers (timm's RoPE bands) stay out of it
    for name, b in gm.named_buffers():
        _assign(result, name, b, False, persistent=name in saved)
    for name, _ in list(result.named_buffers()):  # constants export lifted out of forward (HF BEiT)
        if name not in saved:
            owner, _, leaf = name.rpartition(".")
            result.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    result.ats_options = options
    result.ats_captured_training = model.training
    result.ats_check_inputs = check_inputs
    result.ats_cuda_graphs = cuda_graphs  # may be switched later: model.ats_cuda_graphs = False
    result.ats_patch_gemm = patch_gemm
    result._ats_graphs = graphs.GraphCache()
    result.ats_input_shapes = [tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None for x in pytree.tree_leaves(example)]
    result.register_forward_pre_hook(_check_inputs)
    result.train(model.training)
    validate(result, example, expected)
    _warn_if_static_keeps_every_row(result, options)
    for stage in result.modules():
        if isinstance(stage, ops.ATSStage):
            stage.last = None  # the validation run is not the user's
    log.info("ATS on %s: stages %s of %d attention layers", type(model).__name__, list(options.layers), n)
    return result


def _full_width_cause(stage: "ops.ATSStage", tokens: int) -> str:
    """Why static padding keeps every row of ``stage`` for ``tokens`` input tokens."""
    from .kernels.reference import MIN_TOKENS

    real = tokens - stage.num_prefix
    if stage.k is not None:
        return f"layer {stage.layer}: k={stage.k} >= its {real} non-prefix tokens"
    wanted = int(tokens * stage.ratio + 0.5)
    if wanted < MIN_TOKENS <= tokens:
        return (f"layer {stage.layer}: ratio={stage.ratio} of {tokens} tokens is {wanted}, under the floor of "
                f"{MIN_TOKENS} tokens a stage always keeps, and {MIN_TOKENS} >= its {real} non-prefix tokens")
    return f"layer {stage.layer}: ratio={stage.ratio} of {tokens} tokens is {wanted} >= its {real} non-prefix tokens"


def _warn_if_static_keeps_every_row(model: ATSGraphModule, options) -> None:
    """padding='static' runs K + p rows whatever K' is. Where K + p reaches the stage's input width,
    the stage drops no row: it adds ATS's scoring and sampling and removes no computation. Say so
    once, from the validation run's traces, with each stage's own cause."""
    if options.padding != "static":
        return
    full = [m for m in model.modules() if isinstance(m, ops.ATSStage) and m.last is not None
            and m.last.positions.shape[1] >= m.last.width_in]
    if full:
        causes = "; ".join(_full_width_cause(m, m.last.width_in) for m in full)
        log.warning(
            "padding='static' keeps every row at %d stage(s) (%s), so only the duplicates ATS drops are masked, "
            "and those stages add scoring and sampling without removing computation. Use a smaller ratio or "
            "k, fewer stages, or padding='batch_max', which truncates to the batch's largest K' + prefix.",
            len(full), causes)


SAVE_FORMAT = "ats_fx.save/1"


def save(model: ATSGraphModule, path) -> None:
    """Save an ATS model's weights and transform options to ``path`` (one file, no pickled code).

    ``ats_fx.load(path, original_model)`` rebuilds it: it transforms the original architecture with
    the saved options and loads the saved weights (fine-tuned ones included)."""
    if not isinstance(model, ATSGraphModule):
        raise ATSConfigError("ats_fx.save takes a model made by ats_fx.transform; save a plain model's state_dict")
    if any(shape is None for shape in model.ats_input_shapes):
        raise ATSConfigError("ats_fx.save supports models whose inputs are all tensors")
    opts = model.ats_options
    record = {
        "format": SAVE_FORMAT,
        "stages": [s.layer for s in opts.stages],
        "ratio": [s.ratio for s in opts.stages] if opts.stages[0].k is None else None,
        "k": [s.k for s in opts.stages] if opts.stages[0].k is not None else None,
        "score": opts.score, "padding": opts.padding, "kernels": opts.kernels, "selection": opts.selection,
        "token_output": opts.token_output, "cuda_graphs": model.ats_cuda_graphs,
        "patch_gemm": getattr(model, "ats_patch_gemm", True),
        "check_inputs": model.ats_check_inputs,
        "input_shapes": [list(s) for s in model.ats_input_shapes],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(record, path)


def load(path, model: nn.Module, *, map_location: Any = "cpu") -> ATSGraphModule:
    """Rebuild an ATS model saved by :func:`save` from ``model``, the original architecture (its own
    weights are not used). The file is read with ``torch.load(weights_only=True)``: tensors and
    plain values only, never code."""
    record = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(record, dict) or record.get("format") != SAVE_FORMAT:
        raise ATSConfigError(f"{path} was not written by ats_fx.save")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    example = tuple(torch.randn(2, *shape, dtype=dtype, device=device) for shape in record["input_shapes"])
    result = transform(model, record["stages"], ratio=record["ratio"], k=record["k"], score=record["score"],
                       padding=record["padding"], kernels=record["kernels"], selection=record["selection"],
                       token_output=record.get("token_output", "full"),
                       cuda_graphs=record.get("cuda_graphs", True), patch_gemm=record.get("patch_gemm", True),
                       example_inputs=example,
                       check_inputs=record["check_inputs"])
    result.load_state_dict(record["state_dict"])
    return result


def kept_tokens(model: nn.Module) -> list[ops.StageTrace]:
    """Per ATS stage, what the last forward pass kept: original token positions (-1 = padding),
    K' and K per image. Read from the model; no second forward pass."""
    stages = sorted((m for m in model.modules() if isinstance(m, ops.ATSStage)), key=lambda m: m.layer)
    if not stages:
        raise ATSConfigError("this model has no ATS stages: make it with ats_fx.transform")
    missing = [m.layer for m in stages if m.last is None]
    if missing:
        raise ATSConfigError(f"no forward pass yet (stages {missing}): call the model on a batch first")
    return [m.last for m in stages]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


def _flop_counter() -> FlopCounterMode:
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters without requires_grad for the count, restored after. FlopCounterMode's module
    tracker hooks autograd on module inputs that require grad, and a view of a parameter taken
    under no_grad (CaiT's ``cls_token.expand``) requires grad with no grad_fn, which breaks it."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def count_flops(model: nn.Module, inputs: torch.Tensor, *, per_image: bool = True, macs: bool = True) -> torch.Tensor:
    """GFLOPs of ``model`` on ``inputs``, measured by torch's FlopCounterMode.

    With ``per_image`` each image runs alone, so the count is the image's own adaptive cost
    (no padding from other images); otherwise the batch's total divided by its size. With
    ``macs`` a multiply-add counts once, as in the ATS paper, timm and fvcore (DeiT-S = 4.6).
    Returns a float64 tensor of shape (B,) (or (1,) without per_image).
    """
    batches = [inputs[i : i + 1] for i in range(inputs.shape[0])] if per_image else [inputs]
    out = []
    # The sequential stages: an overlapped one may project every row (passes/defer.py), the
    # received-attention kernels compute the kept rows' logits twice; the count is the method's.
    with torch.no_grad(), _frozen(model), dispatch.sequential_stages():
        for x in batches:
            counter = _flop_counter()
            with counter:
                model(x)
            out.append(counter.get_total_flops() / x.shape[0] / (2 if macs else 1) / 1e9)
    return torch.tensor(out, dtype=torch.float64)
