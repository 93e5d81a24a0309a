"""A light launch path for ``@triton.jit`` kernels with fixed constexprs.

``kernel[grid](*args, **consts)`` costs tens of microseconds of host time per call in
Triton's ``JITFunction.run`` (binding the arguments, computing their specialization key,
looking the kernel up, checking globals) before its compiled launcher runs. At decode sizes
that is most of a kernel's cost. :class:`Launch` does the lookup itself, on a key the
caller computes from the few arguments that change between calls, and then calls the
compiled kernel's own launcher (``CompiledKernel.run``, the same call ``JITFunction.run``
ends in).

The contract that keeps this exact: a :class:`Launch` is built for one kernel and one set
of constexprs and launch options (a cached launch plan), and the caller's key determines
Triton's specialization of every argument that is not fixed for that plan. Triton
specializes a tensor on its dtype and on its data pointer being 16-byte aligned, and an
int on being 1, on divisibility by 16 and on its width (32 or 64 bits); :func:`arg_key`
captures all of that (it refines Triton's key: two calls with one :func:`arg_key` have one
Triton key). The first call for a key goes through ``JITFunction.run`` (which compiles or
finds the kernel) and keeps the compiled kernel; so does every call under
``TRITON_INTERPRET=1`` and every call while a Triton launch hook is installed (profilers
such as proton rely on them).

A caller on a hot path may split the call: :meth:`Launch.kept` finds the compiled kernel
for its key and :meth:`Launch.run` launches it with data pointers given as ints (what
Triton's launcher does with a tensor, minus a driver query per pointer); only when
:meth:`Launch.kept` finds none does it build the tensor arguments for :meth:`Launch.first`.
"""

from __future__ import annotations

import torch

#: ``triton.knobs`` once a kernel has been compiled here (Triton is imported lazily: a
#: CPU-only install never imports it through this module).
_knobs = None

__all__ = ["Launch", "arg_key", "int_key", "launcher"]

_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def int_key(v: int) -> int:
    """Triton's specialization of an int argument, refined: 1, divisible by 16, other;
    32 or 64 bits."""
    cls = 1 if v == 1 else (2 if v % 16 == 0 else 0)
    return cls if _I32_MIN <= v <= _I32_MAX else cls + 4


def arg_key(*args) -> tuple:
    """A key refining Triton's specialization of ``args`` (tensors, ints, floats, bools,
    None, nested tuples of those)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            out.append(a)
        elif isinstance(a, int):
            out.append(int_key(a))
        elif isinstance(a, tuple):
            out.append(arg_key(*a))
        elif isinstance(a, float):
            out.append(0.0)
        else:
            raise TypeError(f"arg_key: unsupported argument type {type(a).__name__}")
    return tuple(out)


def _load_knobs() -> bool:
    global _knobs
    if _knobs is None:
        try:  # Triton >= 3.4
            from triton import knobs
        except ImportError:  # pragma: no cover
            return False
        _knobs = knobs
    return True


def _active(hook) -> bool:
    """Whether a Triton launch hook does anything: a callable (older Triton) or a
    non-empty ``HookChain`` (Triton >= 3.5, where the knob is never None)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooked() -> bool:
    rt = _knobs.runtime
    return _active(rt.launch_enter_hook) or _active(rt.launch_exit_hook)


class Launch:
    """``kernel`` with fixed constexprs/options ``consts``, launched as
    ``launch(grid, key, *args)`` (``args``: every non-constexpr argument, in order; the
    kernel's constexpr parameters must all come after them).
    Compiled kernels are kept per current device, as Triton keeps them."""

    __slots__ = ("_compiled", "_tail", "consts", "kernel")

    def __init__(self, kernel, consts: dict) -> None:
        self.kernel = kernel
        self.consts = consts
        self._compiled: dict = {}
        self._tail: tuple | None = None

    def _constexpr_tail(self, n_args: int) -> tuple | None:
        """The constexpr values in parameter order, as the compiled launcher takes them
        after the runtime arguments (None where the kernel does not fit the contract)."""
        params = getattr(self.kernel, "params", None)
        if params is None or len(params) < n_args:
            return None
        rest = params[n_args:]
        if any(p.is_constexpr for p in params[:n_args]) or not all(p.is_constexpr for p in rest):
            return None
        return tuple(self.consts.get(p.name, p.default) for p in rest)

    def kept(self, key):
        """The compiled kernel kept for ``key`` on the current device with the device's
        current stream, as :meth:`run` takes them; None where the call must go through
        :meth:`first`: not yet compiled here, the interpreter, or a Triton launch hook
        installed."""
        if not self._compiled or _hooked():
            return None
        device = torch.cuda.current_device()
        ck = self._compiled.get((device, key))
        return None if ck is None else (ck, torch._C._cuda_getCurrentRawStream(device))

    def run(self, kept: tuple, grid: tuple, *args) -> None:
        """Launch what :meth:`kept` found. A pointer argument may be given as its tensor or
        as the tensor's data pointer (an int): Triton's launcher takes an int as it is and
        skips the tensor's ``data_ptr`` call and pointer check. The caller has checked the
        tensors' device (a CPU pointer would fault the kernel) and keeps them alive until
        this returns (the launch is then enqueued)."""
        ck, stream = kept
        ck.run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            stream,
            ck.function,
            ck.packed_metadata,
            None,
            None,
            None,
            *args,
            *self._tail,
        )

    def first(self, grid: tuple, key, *args) -> None:
        """Launch through ``JITFunction.run`` (tensors as tensors), which compiles or finds
        the kernel, and keep it for ``key`` where the light path can take it."""
        compiled = self.kernel[grid](*args, **self.consts)
        if not hasattr(compiled, "packed_metadata") or not _load_knobs():
            return  # the interpreter (or an older Triton): the JIT path every time
        if self._tail is None:
            self._tail = self._constexpr_tail(len(args))
            if self._tail is None:
                return
        self._compiled[torch.cuda.current_device(), key] = compiled

    def __call__(self, grid: tuple, key, *args) -> None:
        kept = self.kept(key)
        if kept is not None:
            self.run(kept, grid, *args)
        else:
            self.first(grid, key, *args)


_LAUNCHES: dict = {}


def launcher(kernel, **consts) -> Launch:
    """The :class:`Launch` of ``kernel`` with these constexprs and options (one per distinct
    set, kept for the process). Its callers key every argument: ``arg_key(*args)``."""
    key = (kernel, *consts.items())
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _LAUNCHES[key] = Launch(kernel, consts)
    return launch
