"""The Hadamard transform as one ``torch.library`` custom op.

Why a custom op: models call it through ``torch.ops.hadamard_kq.hadamard_transform``, so
``torch.compile`` sees a single opaque node (no graph breaks, no tracing into Triton), the
fake kernel gives shapes to the compiler, and autograd is defined once for every device.

Why one op with ``matrix`` and ``block`` arguments rather than siblings: every transform a
compressed-tensors checkpoint can ask for (Sylvester, random-hadamard, randomize, a stored
random matrix, block-diagonal application when ``scheme.head_dim`` < the model's head_dim) is
"multiply each ``block``-sized chunk of the last dim by a ``block x block`` matrix, times a
scale". One signature therefore serves all of them and one GPU kernel implements it.

Numerics: every implementation accumulates in fp32 (fp64 for fp64 inputs) and rounds once
to the input dtype, so a 16-bit result is the exact product rounded once.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import cpp_launch, forward_mode, native
from .matrices import MAX_SYLVESTER_SIZE, is_power_of_two, sylvester

#: Largest Sylvester block the torch path multiplies densely. Above it the matrix is factored
#: as a Kronecker product of balanced Sylvester blocks of at most 2**_FACTOR_BITS (fewer
#: flops; on the 2-core CPU dense was faster up to 512 and 1.6-2x slower from 1024 on).
_DENSE_MAX = 512
_FACTOR_BITS = 7

#: Largest explicit-matrix block the Triton kernel takes; larger explicit matrices use torch.
TRITON_MAX_MATRIX_BLOCK = 256

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _factored_sylvester(xs: torch.Tensor, n: int) -> torch.Tensor:
    """``xs @ H_n`` for a power-of-two ``n`` as a sequence of small dense products.

    ``H_ab = H_a (x) H_b`` in Sylvester ordering, so viewing each row as an array of shape
    ``(f_1, ..., f_m)`` the product is one small matmul along each axis. Each step multiplies
    the last axis and rotates it to the front, so after ``m`` steps the axes are back in order.
    """
    rows = xs.shape[0]
    bits = n.bit_length() - 1
    steps = -(-bits // _FACTOR_BITS)
    y = xs
    for i in range(steps):
        f = 1 << (bits // steps + (1 if i < bits % steps else 0))
        h = sylvester(f, xs.dtype, xs.device)
        y = (y.reshape(rows * (n // f), f) @ h).reshape(rows, n // f, f).transpose(1, 2)
    return y.reshape(rows, n)


def torch_hadamard(
    x: torch.Tensor, scale: float, matrix: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    """Device-agnostic implementation (CPU, and CUDA/ROCm where Triton cannot serve)."""
    shape = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.numel() // block
    xs = x.reshape(rows, block).to(compute)
    if matrix is not None:
        y = xs @ matrix.to(device=x.device, dtype=compute)
    elif block <= _DENSE_MAX:
        y = xs @ sylvester(block, compute, x.device)
    else:
        y = _factored_sylvester(xs, block)
    y = y * scale
    return y.to(x.dtype).reshape(shape)


@torch.library.custom_op("hadamard_kq::hadamard_transform", mutates_args=())
def _hadamard_op(
    x: torch.Tensor, scale: float, matrix: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    return torch_hadamard(x, scale, matrix, block)


#: ``torch.compiler.is_compiling`` (dynamo folds it to True while tracing, so a traced call
#: never reaches the C++ table, which it could not trace).
_is_compiling = torch.compiler.is_compiling

#: How many dispatch modes are active (a mode -- a flop counter, FakeTensorMode -- must see the
#: op, so none of the direct paths below serves a call under one).
_dispatch_modes = torch._C._len_torch_dispatch_stack

_triton_impl = None
_warned_no_triton = False
#: triton_kernel.FAST once the kernel module is loaded (the eager fast path's closures).
_FAST: dict = {}


def _load_triton():
    """Import the Triton kernel on first CUDA call only: CPU users never import triton."""
    global _triton_impl, _warned_no_triton, _FAST
    if _triton_impl is None:
        from . import triton_kernel

        if triton_kernel.triton_available():
            _triton_impl = triton_kernel.hadamard_triton
            _FAST = triton_kernel.FAST
        else:
            _triton_impl = False
            if not _warned_no_triton:
                _warned_no_triton = True
                warnings.warn(
                    "hf_hadamard_kq: triton is not importable, so GPU Hadamard transforms use "
                    "torch matmuls (correct, but slower). Install the triton build that matches "
                    "your torch to get the fast kernel.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _triton_impl


@_hadamard_op.register_kernel("cuda")
def _hadamard_cuda(
    x: torch.Tensor, scale: float, matrix: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    triton_ok = x.dtype != torch.float64 and (
        matrix is None or block <= TRITON_MAX_MATRIX_BLOCK
    )
    if triton_ok:
        impl = _load_triton()
        if impl:
            return impl(x, scale, matrix, block)
    return torch_hadamard(x, scale, matrix, block)


@_hadamard_op.register_fake
def _hadamard_fake(
    x: torch.Tensor, scale: float, matrix: Optional[torch.Tensor], block: int
) -> torch.Tensor:
    return x.new_empty(x.shape)


_OP = torch.ops.hadamard_kq.hadamard_transform.default


class _Differentiable(torch.autograd.Function):
    """The op under reverse-mode autograd (and forward mode on the same call).

    ``y = x W s`` blockwise, linear in ``x`` and in ``W``, so both derivatives are the op
    again: ``dx = g W^T s`` and ``dW = s x^T g`` summed over blocks (backward), ``dy = s (dx W
    + x dW)`` (jvp).
    """

    @staticmethod
    def forward(x, scale, matrix, block):
        return _OP(x, scale, matrix, block)  # grad modes are off in here: the kernel runs

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, matrix, block = inputs
        ctx.scale = scale
        ctx.block = block
        keep_x = matrix is not None and matrix.requires_grad
        ctx.save_for_backward(matrix, x if keep_x else None)
        if forward_mode.may_be_dual(x, matrix):  # (else the node would keep x until backward)
            ctx.save_for_forward(x, matrix)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        matrix, x = ctx.saved_tensors
        grad_x = grad_matrix = None
        if ctx.needs_input_grad[0]:
            mt = None if matrix is None else matrix.mT.contiguous()
            grad_x = _OP(grad, ctx.scale, mt, ctx.block)
        if matrix is not None and ctx.needs_input_grad[2]:
            compute = torch.float64 if matrix.dtype == torch.float64 else torch.float32
            xb = x.reshape(-1, ctx.block).to(compute)
            gb = grad.reshape(-1, ctx.block).to(compute)
            grad_matrix = ((xb.mT @ gb) * ctx.scale).to(matrix.dtype)
        return grad_x, None, grad_matrix, None

    @staticmethod
    def jvp(ctx, x_t, scale_t, matrix_t, block_t):
        x, matrix = ctx.saved_tensors
        return _tangent(x, x_t, ctx.scale, matrix, matrix_t, ctx.block)


def _tangent(x, x_t, scale, matrix, matrix_t, block):
    """The output's tangent, ``s (x_t W + x W_t)`` (None tangents are zero)."""
    out = None if x_t is None else _OP(x_t, scale, matrix, block)
    if matrix_t is not None:
        part = _OP(x, scale, matrix_t, block)
        out = part if out is None else out + part
    return out


def _autograd_kernel(keyset, x, scale, matrix, block):
    """The op's autograd kernel, in place of ``register_autograd``'s, which ignores forward-mode
    tangents: a dual input not requiring grad reached the kernel below autograd and came back
    without a tangent (``torch.autograd.forward_ad``: none; ``torch.func.jvp``: zero). Here the
    tangent is computed with the op and attached to the output, as torch's own kernels do."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, matrix):
        return _reverse(x, scale, matrix, block)  # the Function's jvp gives any tangent
    tangent = None
    if torch._C._is_fwd_grad_enabled() and forward_mode.may_be_dual(x, matrix):
        x_p, x_t = forward_mode.primal_tangent(x)
        m_p, m_t = forward_mode.primal_tangent(matrix)
        tangent = _tangent(x_p, x_t, scale, m_p, m_t, block)
    with torch._C._AutoDispatchBelowAutograd():
        y = _OP.redispatch(keyset & torch._C._after_autograd_keyset, x, scale, matrix, block)
    return y if tangent is None else forward_mode.make_dual(y, tangent)


def _reverse(x, scale, matrix, block):
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            "hadamard_kq::hadamard_transform: torch.func's reverse-mode transforms (grad, vjp, "
            "jacrev) cannot record this op (torch applies an autograd.Function only at the "
            "top level). Use torch.autograd.grad or .backward(), or torch.func.jvp / jacfwd "
            "(forward mode), which are supported."
        )
    return _Differentiable.apply(x, scale, matrix, block)


#: Every runtime autograd key torch can name: a kernel on the ``Autograd`` alias itself would
#: replace the one ``custom_op`` registered there (torch warns on that), while a runtime key's
#: own kernel takes precedence over the alias's. Keys this torch cannot name in a registration
#: (MTIA, MAIA, VE here) keep the alias's kernel: reverse mode below, no forward mode.
_AUTOGRAD_KEYS = [
    k for k in dir(torch._C.DispatchKey)
    if k.startswith("Autograd") and k not in ("Autograd", "AutogradFunctionality")
    and torch._C._parse_dispatch_key(k) is not None
]
_hadamard_op.register_autograd(_Differentiable.backward,
                               setup_context=_Differentiable.setup_context)
_AUTOGRAD_LIB = torch.library.Library("hadamard_kq", "IMPL")
for _key in _AUTOGRAD_KEYS:
    _AUTOGRAD_LIB.impl("hadamard_transform", _autograd_kernel, _key, with_keyset=True)


def _vmap_rule(info, in_dims, x, scale, matrix, block):
    """``torch.vmap`` (and ``jacfwd``, which vmaps the jvp) without torch's per-example
    fallback (a loop with a "performance drop" warning): the op already takes any leading
    shape, so a batch of inputs is one call with the batch dimension in front; a batch of
    matrices (rare) is one call per matrix."""
    x_dim, _, m_dim, _ = in_dims
    if m_dim is None:
        return _OP(x.movedim(x_dim, 0), scale, matrix, block), 0
    matrices = matrix.movedim(m_dim, 0)
    xs = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
    if info.batch_size == 0:
        return xs.new_empty(xs.shape), 0
    return torch.stack([_OP(xs[i], scale, matrices[i], block)
                        for i in range(info.batch_size)]), 0


_hadamard_op.register_vmap(_vmap_rule)


def hadamard_apply(
    x: torch.Tensor,
    scale: float,
    matrix: Optional[torch.Tensor],
    block: int,
    fusable: bool = True,
) -> torch.Tensor:
    """Hot-path entry for pre-validated arguments (the model hooks call this).

    In plain eager inference the custom-op dispatcher costs more host time than the kernel
    launch itself (measured on an H100 host: ~80 us per decode call through ``torch.ops``
    vs ~43 us calling the Triton launcher directly), so plain tensors without autograd go
    straight to the same implementation the op would run; for a Sylvester rotation of a CUDA
    layout seen before, to the launch cached for that layout: in C++ (``cpp_launch.TABLE``,
    looked up in C++) where that module could be built, else a Python closure around triton's
    launcher (``triton_kernel.FAST``); either does per call only the checks that depend on
    the call, the allocation and the launch. Under
    ``torch.compile``, autograd, tensor subclasses (DTensor, FakeTensor) or dispatch modes,
    the op is used so that the compiler, autograd, subclass dispatch and the mode see one node
    (FakeTensor is a subclass, so fake/meta tracing also takes the op) -- except where
    :func:`native.use_native` says the tensor takes the native form (small tensors by
    default, see native.set_compile_rotation): then torch.compile traces plain torch ops it
    can fuse (native.py).
    ``fusable=False`` keeps the op even then: for a caller whose roundings around the call
    matter (a scheme ``precision`` cast), which inductor would fuse away.
    """
    compiling = _is_compiling()
    if matrix is None and not compiling:
        # The C++ launches, looked up in C++, which also declines what the checks below
        # exclude (a subclass, a wrapper or lazy view, a dispatch mode, an input autograd
        # would record, not CUDA, a new layout): the common eager call pays for no Python
        # check.
        table = cpp_launch.TABLE
        if table is not None:
            out = table(x, scale, block)
            if out is not None:
                return out
    if (
        type(x) is torch.Tensor
        and not compiling
        and not _dispatch_modes()
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or (matrix is not None and matrix.requires_grad))
        )
    ):
        if x.is_cuda:
            if cpp_launch.plain_cuda(x, matrix):  # else (a functionalization wrapper, a lazy
                # view...) the op's dispatch unwraps it: a direct launch would read no data
                if matrix is None:  # a layout seen before
                    fast = _FAST.get((x.shape, x.stride(), x.dtype, x.get_device(), block))
                    if fast is not None:
                        out = fast(x, scale)
                        if out is not None:
                            return out
                return _hadamard_cuda(x, scale, matrix, block)
        elif x.device.type == "cpu":
            return torch_hadamard(x, scale, matrix, block)
    if (
        fusable
        and block <= native.NATIVE_MAX_BLOCK
        and type(x) is torch.Tensor  # not a DTensor: plain ops with a plain matrix
        and compiling
        and native.use_native(x, block)
    ):
        return native.native_hadamard(x, scale, matrix, block)
    return torch.ops.hadamard_kq.hadamard_transform(x, scale, matrix, block)


def _resolve_args(
    x: torch.Tensor,
    scale: Optional[float],
    matrix: Optional[torch.Tensor],
    block: Optional[int],
) -> tuple[float, Optional[torch.Tensor], int]:
    """Validate user arguments once, with errors that say what to change."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hadamard_transform expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"hadamard_transform supports float16, bfloat16, float32 and float64 inputs, "
            f"got {x.dtype}; cast the tensor first"
        )
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension (it transforms the last)")
    d = x.shape[-1]
    if d == 0:
        raise ValueError("hadamard_transform: the last dimension is empty (size 0)")
    if matrix is not None:
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square 2-D, got shape {tuple(matrix.shape)}")
        if matrix.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"matrix must be a float tensor, got {matrix.dtype}")
        if matrix.device != x.device:
            raise ValueError(
                f"matrix is on {matrix.device} but x is on {x.device}; move it to x's device"
            )
        if block is None:
            block = matrix.shape[0]
        elif block != matrix.shape[0]:
            raise ValueError(f"block={block} does not match matrix size {matrix.shape[0]}")
    elif block is None:
        block = d
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if d % block != 0:
        raise ValueError(
            f"the last dimension ({d}) is not a multiple of the block size ({block})"
        )
    if matrix is None:
        if not is_power_of_two(block):
            raise ValueError(
                f"the Sylvester Hadamard transform needs a power-of-two size, got {block}; "
                "pass matrix= (e.g. a random-hadamard matrix) for other sizes"
            )
        if block > MAX_SYLVESTER_SIZE:
            raise ValueError(
                f"size {block} exceeds the supported maximum {MAX_SYLVESTER_SIZE}; "
                "pass block= to apply a smaller transform block-diagonally"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(block)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale, matrix, block


def hadamard_transform(
    x: torch.Tensor,
    *,
    scale: Optional[float] = None,
    matrix: Optional[torch.Tensor] = None,
    block: Optional[int] = None,
) -> torch.Tensor:
    """Multiply each ``block``-sized chunk of ``x``'s last dim by a Hadamard matrix.

    Args:
        x: any shape and strides; float16, bfloat16, float32 or float64.
        scale: multiplies the result; default ``1/sqrt(block)`` (orthonormal transform).
        matrix: an explicit ``(block, block)`` matrix (e.g. random-hadamard, or a stored
            ``random-matrix``) used instead of the Sylvester matrix. ``y = x_chunk @ matrix``.
        block: chunk size; default the last dim (or the matrix size). A block smaller than the
            last dim applies the transform block-diagonally, as compressed-tensors does when a
            scheme's ``head_dim`` is smaller than the model's.

    Returns:
        A new tensor with ``x``'s shape and dtype, computed in fp32 (fp64 for fp64 input) and
        rounded once.
    """
    scale, matrix, block = _resolve_args(x, scale, matrix, block)
    return hadamard_apply(x, scale, matrix, block)
