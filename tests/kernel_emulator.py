"""Runs train_gpt.py's GPU kernels on the CPU, for the tests: a kernel's Python body runs with torch tensors,
program after program, with or without Triton installed.

What it models, and so what a test through it can catch:
- Operators and builtins with Triton's types (a scalar follows the tensor's type; integer // and % truncate), loads
  and stores through pointers with masks, tensor descriptors' block loads and stores (zero past the edges).
- Gluon's shared memory (unwritten, it reads as nan), mbarriers that block for real (arrivals, expected bytes,
  phases, waits on a parity), each warp_specialize partition in its own thread, TMA copies, and wgmma: an
  asynchronous one reads its shared-memory operands only when a warpgroup_mma_wait retires it, and TMA stores
  read theirs at tma.store_wait. A TMA load leaves its buffer as garbage (nan) at once and lands when a wait on
  its barrier needs it, and each completed phase lets the woken threads run first: a buffer released before the
  reads of it are done, or read before its barrier, gives wrong numbers; a protocol whose waits cannot all pass
  raises after TIMEOUT seconds without progress.
- Matmuls multiply exactly and add in float32, a tile and a step along K at a time, as the kernel orders them.
- A program's shared memory against Hopper's 227 KB (its allocations; the compiler adds scratch of its own).
What it does not: layouts, registers, timing, and the special-function instructions' approximations (exact here).

    with emulate(train_gpt, sms=3):  # a persistent grid of 3 programs
        h = train_gpt._matmul_relu2_cuda(x, w)
"""
import contextlib
import itertools
import math
import threading
import time
import types

import torch

TIMEOUT = 20.0


class T:
    """A program's register tensor or scalar: a torch tensor with Triton's operators."""
    __slots__ = ("t",)
    __hash__ = None

    def __init__(self, t):
        self.t = t if isinstance(t, torch.Tensor) else _scalar(t, None)

    shape = property(lambda self: list(self.t.shape))
    dtype = property(lambda self: self.t.dtype)
    T = property(lambda self: T(self.t.T))

    def to(self, dtype, bitcast=False, **_):
        if bitcast:
            return T(self.t.view(dtype))
        if self.t.dtype.is_floating_point and not dtype.is_floating_point:
            return T(self.t.double().trunc().to(dtype))  # float to int truncates
        return T(self.t.to(dtype))

    def __getitem__(self, index):
        return T(self.t[index])

    def __index__(self):
        assert self.t.numel() == 1 and not self.t.dtype.is_floating_point
        return int(self.t.item())

    __int__ = __index__

    def __float__(self):
        return float(self.t.item())

    def __bool__(self):
        assert self.t.numel() == 1, "the truth of a tensor of several values"
        return bool(self.t.item())

    def __neg__(self):
        return T(-self.t)

    def __invert__(self):
        return T(~self.t)


def _v(x):
    """The torch tensor (or Python scalar) behind an operand."""
    if isinstance(x, Pending):
        raise RuntimeError("a wgmma's result used before a warpgroup_mma_wait retired it")
    return x.t if isinstance(x, T) else x


def _scalar(x, like):
    """A Python scalar as a tensor beside `like`: of `like`'s type where its kind (int < float) is no higher."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(x)
    if like is not None and like.dtype != torch.bool and (like.dtype.is_floating_point or isinstance(x, int)):
        return torch.tensor(x, dtype=like.dtype)
    if isinstance(x, int):
        return torch.tensor(x, dtype=torch.int32 if -2**31 <= x < 2**31 else torch.int64)
    return torch.tensor(x, dtype=torch.float32)


def _pair(a, b):
    a, b = _v(a), _v(b)
    a = _scalar(a, b if isinstance(b, torch.Tensor) else None)
    return a, _scalar(b, a)


def _math(op, div=False):
    def f(a, b):
        a, b = _pair(a, b)
        if not (a.dtype.is_floating_point or b.dtype.is_floating_point):
            return T(op(a, b))
        dtype = torch.promote_types(a.dtype, b.dtype)
        if div and dtype.itemsize < 4:
            dtype = torch.float32  # / and % of 16-bit floats give float32
        return T(op(a.float() if a.dtype.itemsize < 4 else a, b.float() if b.dtype.itemsize < 4 else b).to(dtype))
    return f


def _int_op(op):
    def f(a, b):
        a, b = _pair(a, b)
        return T(op(a, b))
    return f


def _floordiv(a, b):
    a, b = _pair(a, b)
    assert not (a.dtype.is_floating_point or b.dtype.is_floating_point), "// of floats"
    return T(torch.div(a, b, rounding_mode="trunc"))


_OPS = {"add": _math(torch.add), "sub": _math(torch.sub), "mul": _math(torch.mul),
        "truediv": _math(lambda a, b: a.float() / b.float() if not a.dtype.is_floating_point else a / b, div=True),
        "floordiv": _floordiv, "mod": _math(torch.fmod, div=True), "and": _int_op(torch.bitwise_and),
        "or": _int_op(torch.bitwise_or), "xor": _int_op(torch.bitwise_xor),
        "lshift": _int_op(torch.bitwise_left_shift), "rshift": _int_op(torch.bitwise_right_shift)}
for _name, _fn in _OPS.items():
    setattr(T, f"__{_name}__", _fn)
    setattr(T, f"__r{_name}__", lambda a, b, _fn=_fn: _fn(b, a))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(T, f"__{_name}__", _int_op(getattr(torch, _name)))


class Ptr:
    """Pointers: a kernel argument's whole storage, flat, and offsets into it."""

    def __init__(self, flat: torch.Tensor, offsets):
        self.flat, self.offsets = flat, offsets

    def __add__(self, offsets):
        return Ptr(self.flat, _offsets(self.offsets) + _offsets(offsets))

    __radd__ = __add__

    def __sub__(self, offsets):
        return Ptr(self.flat, _offsets(self.offsets) - _offsets(offsets))

    dtype = property(lambda self: self.flat.dtype)


def _offsets(x):
    x = _v(x)
    return x.long() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64)


def pointer_to(t: torch.Tensor) -> Ptr:
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.itemsize,))
    return Ptr(flat, t.storage_offset())


def _check_bounds(ptr, offsets, what):
    assert not offsets.numel() or 0 <= offsets.min() and offsets.max() < ptr.flat.numel(), f"a {what} out of bounds"


def load(ptr, mask=None, other=None, **_):
    mask = _v(mask)
    offsets, mask = torch.broadcast_tensors(_offsets(ptr.offsets), torch.tensor(True) if mask is None else mask)
    _check_bounds(ptr, offsets[mask], "load")
    values = ptr.flat[torch.where(mask, offsets, 0)]
    fill = torch.zeros((), dtype=ptr.dtype) if other is None else _scalar(_v(other), ptr.flat).to(ptr.dtype)
    return T(torch.where(mask, values, fill))


def store(ptr, value, mask=None, **_):
    value = _scalar(_v(value), ptr.flat).to(ptr.dtype)
    mask = _v(mask)
    offsets, value, mask = torch.broadcast_tensors(_offsets(ptr.offsets), value,
                                                   torch.tensor(True) if mask is None else mask)
    offsets, value = offsets[mask], value[mask]
    assert offsets.numel() == offsets.unique().numel(), "a store writes one address twice"
    _check_bounds(ptr, offsets, "store")
    ptr.flat[offsets] = value


# --------------------------------------------------------------------------------------------------------------
# Programs, partitions and mbarriers

class _Program(threading.local):
    pid, grid = (0, 0, 0), (1, 1, 1)
    wgmma: list = []  # this partition's wgmma in flight, oldest first
    stores: list = []  # and its TMA stores


SHARED_BYTES = 232_448  # the most shared memory a Hopper program may take (227 KB)
program = _Program()
_lock = threading.Condition()
# phases completed by any barrier; whether a partition of this program raised; the shared memory it allocated
_state = {"progress": 0, "failed": False, "shared": 0}


class Barrier:
    def __init__(self):
        self.count = None  # arrivals a phase, once initialised
        self.pending = self.bytes = self.phases = 0
        self.copies = []  # TMA loads issued on it that have not landed

    def _maybe_complete(self):
        assert self.pending >= 0, "more arrivals than the mbarrier's count in one phase"
        if self.pending == 0 and self.bytes == 0:
            self.phases += 1
            self.pending = self.count
            _state["progress"] += 1
            _lock.notify_all()
            return True
        return False

    def arrive(self, count=1, expect_bytes=0):
        with _lock:
            assert self.count is not None, "an arrival on an mbarrier never initialised"
            self.pending -= count
            self.bytes += expect_bytes
            completed = self._maybe_complete()
        if completed:
            time.sleep(0)  # the threads this phase wakes run first

    def landed(self, nbytes):  # under _lock
        self.bytes -= nbytes
        self._maybe_complete()

    def wait(self, parity):
        with _lock:
            assert self.count is not None, "a wait on an mbarrier never initialised"
            still, seen = 0.0, _state["progress"]
            while self.phases % 2 == parity % 2:  # the phase of this parity has not completed
                while self.copies:
                    self.copies.pop(0)()
                if self.phases % 2 != parity % 2:
                    break
                if _state["failed"]:
                    raise RuntimeError("another partition of the program failed")
                _lock.wait(0.01)
                still = 0.0 if seen != _state["progress"] else still + 0.01
                seen = _state["progress"]
                if still > TIMEOUT:
                    raise RuntimeError(f"deadlock: program {program.pid} waits for parity {parity} of an mbarrier "
                                       f"after {self.phases} phases, {self.pending} arrivals and {self.bytes} "
                                       f"bytes short")


class Shared:
    """Shared memory, or a view of it (index, slice, permute); for mbarriers, a list of them."""

    def __init__(self, t, barriers=None):
        self.t, self.barriers = t, barriers

    def index(self, i):
        return self.barriers[int(i)] if self.barriers is not None else Shared(self.t[int(i)])

    def slice(self, start, length, dim=0):
        return Shared(self.t.narrow(dim, int(start), int(length)))

    def permute(self, order):
        return Shared(self.t.permute(*order))

    def load(self, layout=None):
        return T(self.t.clone())

    def store(self, value):
        value = _v(value)
        assert value.dtype == self.t.dtype and value.shape == self.t.shape, (value.dtype, value.shape, self.t.shape)
        self.t.copy_(value)

    shape = property(lambda self: list(self.t.shape))
    dtype = property(lambda self: self.t.dtype)


class MBarrierLayout:
    def __init__(self, *args, **kwargs):
        pass


def _garbage(t):
    """Fills t as memory that holds nothing yet: nan where its type has one (0x7F bytes: nan in float8), else 0x7F."""
    if t.dtype.is_floating_point and t.dtype.itemsize > 1:
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0x7F)


def allocate_shared_memory(dtype, shape, layout=None, value=None):
    shape = [int(s) for s in shape]
    _state["shared"] += dtype.itemsize * math.prod(shape)
    assert _state["shared"] <= SHARED_BYTES, f"a program allocates {_state['shared']} bytes of shared memory"
    if isinstance(layout, MBarrierLayout):
        return Shared(None, [Barrier() for _ in range(shape[0])])
    t = torch.empty(shape, dtype=dtype)
    _garbage(t)
    if value is not None:
        t.copy_(_v(value))
    return Shared(t)


def _init(bar, count):
    assert bar.count is None, "an mbarrier initialised twice"
    bar.count = bar.pending = int(count)


def _expect(bar, nbytes, pred=True):  # an arrival that also expects nbytes of TMA loads
    if _v(pred):
        bar.arrive(1, int(nbytes))


def _arrive(bar, *, count=1, pred=True):
    if _v(pred):
        bar.arrive(int(count))


def _wait(bar, phase, pred=True, deps=()):
    if _v(pred):
        bar.wait(int(phase))


mbarrier = types.SimpleNamespace(init=_init, expect=_expect, arrive=_arrive, wait=_wait,
                                 MBarrierLayout=MBarrierLayout, invalidate=lambda bar: None)


# --------------------------------------------------------------------------------------------------------------
# Tensor descriptors and the TMA

class Descriptor:
    """A host-made descriptor of a tensor in blocks, for Triton's descriptor loads and Gluon's TMA."""

    def __init__(self, t, block_shape, layout=None):
        self.tensor, self.layout = t, layout
        self.block_shape = [int(b) for b in block_shape]
        self.block_type = types.SimpleNamespace(shape=list(self.block_shape),
                                                nbytes=t.itemsize * math.prod(self.block_shape))

    @classmethod
    def from_tensor(cls, t, block_shape, layout=None):
        return cls(t, block_shape, layout)

    dtype = property(lambda self: self.tensor.dtype)

    def _box(self, coord):
        """The part of the block at coord inside the tensor, and where it lies in the block: empty for a block wholly
        outside, which the TMA loads as zeros and stores nowhere."""
        coord = [int(c) for c in coord]
        inside = []
        for c, b, n in zip(coord, self.block_shape, self.tensor.shape):
            start = min(max(c, 0), n)
            inside.append(slice(start, max(min(c + b, n), start)))
        return tuple(inside), tuple(slice(max(s.start - c, 0), max(s.stop - c, 0)) for s, c in zip(inside, coord))

    def load(self, coord):
        inside, part = self._box(coord)
        block = torch.zeros(self.block_shape, dtype=self.dtype)
        block[part] = self.tensor[inside]
        return T(block)

    def store(self, coord, value):
        inside, part = self._box(coord)
        self.tensor[inside] = _v(value).to(self.dtype)[part]


def _tma_load(desc, coord, bar, dest, pred=True):
    if _v(pred):
        _garbage(dest.t)  # undefined while the copy is in flight: it lands when a wait on bar needs it
        with _lock:
            bar.copies.append(lambda: (dest.t.copy_(desc.load(coord).t), bar.landed(desc.block_type.nbytes)))


def _tma_store(desc, coord, src):
    program.stores.append(lambda: desc.store(coord, src.t))  # reads src when it leaves, at store_wait


def _store_wait(pendings):
    while len(program.stores) > int(pendings):
        program.stores.pop(0)()


tma = types.SimpleNamespace(async_copy_global_to_shared=_tma_load, async_copy_shared_to_global=_tma_store,
                            async_load=_tma_load, async_store=_tma_store, store_wait=_store_wait)


# --------------------------------------------------------------------------------------------------------------
# wgmma

class Pending:
    """An asynchronous wgmma in flight; it reads its operands when retired."""

    def __init__(self, a, b, acc, use_acc):
        self.a, self.b, self.acc, self.use_acc, self.value = a, b, acc, use_acc, None

    def retire(self) -> T:
        if self.value is None:
            acc = self.acc.retire().t if isinstance(self.acc, Pending) else _v(self.acc)
            a = self.a.t if isinstance(self.a, Shared) else _v(self.a)
            product = a.float() @ self.b.t.float()
            self.value = T(acc + product if _v(self.use_acc) else product)
        return self.value


def warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    assert isinstance(b, Shared), "wgmma's second operand is in shared memory"
    op = Pending(a, b, acc, use_acc)
    if not is_async:
        warpgroup_mma_wait(0)
        return op.retire()
    program.wgmma.append(op)
    return op


def warpgroup_mma_wait(num_outstanding=0, deps=()):
    while len(program.wgmma) > int(num_outstanding):
        program.wgmma.pop(0).retire()
    # a dep still in flight stays a token: only a later wgmma (as its accumulator) or wait may take it
    results = [d.value if isinstance(d, Pending) and d.value is not None else d for d in deps]
    return results[0] if len(results) == 1 else tuple(results)


# --------------------------------------------------------------------------------------------------------------
# The languages' other builtins, one namespace for tl and gl

def _run(fn, args, kwargs, pid, grid):
    """fn as program pid of grid, or as a partition of it: its wgmma and TMA stores finish before it returns."""
    program.pid, program.grid, program.wgmma, program.stores = pid, grid, [], []
    result = fn(*args, **kwargs)
    warpgroup_mma_wait(0)
    _store_wait(0)
    return result


def warp_specialize(functions_and_args, worker_num_warps=None, worker_num_regs=None):
    pid, grid, results, errors = program.pid, program.grid, {}, []

    def run(i, fn, args):
        try:
            results[i] = _run(fn, args, {}, pid, grid)
        except BaseException as e:  # noqa: BLE001 - re-raised by the program
            errors.append(e)
            with _lock:
                _state["failed"] = True
                _lock.notify_all()

    threads = [threading.Thread(target=run, args=(i, fn, args), daemon=True)
               for i, (fn, args) in enumerate(functions_and_args)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _reduce(op):
    def f(x, axis=None, keep_dims=False, **_):
        x = _v(x)
        out = op(x.float() if x.dtype.itemsize < 4 and x.dtype.is_floating_point else x,
                 *(() if axis is None else (int(axis), keep_dims)))
        return T(out.to(x.dtype) if x.dtype.is_floating_point or x.dtype.itemsize == 8 else out.int())
    return f


def _elementwise(op):
    def f(a, b, **_):
        a, b = _pair(a, b)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return T(op(a.to(dtype), b.to(dtype)))
    return f


def _unary(op):
    def f(x, **_):
        x = _scalar(_v(x), None)
        return T(op(x.float()).to(x.dtype) if x.dtype.is_floating_point else op(x.float()))
    return f


def where(condition, a, b):
    a, b = _pair(a, b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return T(torch.where(_v(condition), a.to(dtype), b.to(dtype)))


def dot(a, b, acc=None, **_):
    product = _v(a).float() @ _v(b).float()
    return T(product if acc is None else _v(acc) + product)


def inline_asm_elementwise(asm, constraints, args, dtype, is_pure=True, pack=1):
    args = [_v(arg).float() for arg in args]
    for instruction, fn in (("tanh.approx", torch.tanh), ("ex2.approx", torch.exp2), ("rcp.approx", torch.reciprocal),
                            ("cvt.rn.bf16x2.f32", lambda x: x.bfloat16()),
                            ("max.bf16x2", lambda x: x.relu().square()),  # train_gpt's _relu_square_bf16
                            ("add.rn.bf16x2", lambda a, b: a + b),  # train_gpt's _add_bf16
                            ("shl.b32", lambda x: x)):  # train_gpt's _f32_of_bf16
        if instruction in asm:
            return T(fn(*args).to(dtype))
    raise NotImplementedError(f"the emulator has no inline assembly {asm!r}")


class _Layout:
    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def get_default_for(cls, *args, **kwargs):
        return cls()


def _range(*args, **_):
    return range(*(int(a) for a in args))


def _cdiv(a, b):
    return (a + b - 1) // b


def _static_assert(condition, message=""):
    assert _v(condition), message


lang = types.SimpleNamespace(
    constexpr=lambda value=None: value, tensor=T,
    float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16, float64=torch.float64,
    int64=torch.int64, int32=torch.int32, int16=torch.int16, int8=torch.int8, int1=torch.bool,
    float8e4nv=torch.float8_e4m3fn, float8e5=torch.float8_e5m2,
    program_id=lambda axis: program.pid[axis], num_programs=lambda axis: program.grid[axis],
    arange=lambda start, end, layout=None: T(torch.arange(int(start), int(end), dtype=torch.int32)),
    zeros=lambda shape, dtype, layout=None: T(torch.zeros([int(s) for s in shape], dtype=dtype)),
    full=lambda shape, value, dtype, layout=None: T(torch.full([int(s) for s in shape], _v(value), dtype=dtype)),
    load=load, store=store, where=where, dot=dot, trans=lambda x: T(_v(x).T),
    reshape=lambda x, shape, **_: T(_v(x).reshape([int(n) for n in shape])),
    permute=lambda x, dims: T(_v(x).permute(*dims)), split=lambda x: (T(_v(x)[..., 0]), T(_v(x)[..., 1])),
    join=lambda a, b: T(torch.stack(_pair(a, b), -1)),
    sum=_reduce(torch.sum), max=_reduce(torch.amax), min=_reduce(torch.amin),
    maximum=_elementwise(torch.maximum), minimum=_elementwise(torch.minimum),
    exp=_unary(torch.exp), exp2=_unary(torch.exp2), log=_unary(torch.log), log2=_unary(torch.log2),
    sqrt=_unary(torch.sqrt), rsqrt=_unary(torch.rsqrt), abs=_unary(torch.abs),
    math=types.SimpleNamespace(exp2=_unary(torch.exp2), log2=_unary(torch.log2)),
    fdiv=lambda a, b, **_: a / b, cdiv=_cdiv,
    inline_asm_elementwise=inline_asm_elementwise, convert_layout=lambda x, layout, **_: x,
    static_assert=_static_assert, static_range=_range, range=_range, warp_specialize=warp_specialize,
    thread_barrier=lambda: None, barrier=lambda **_: None,  # a partition's warps run here as one thread
    allocate_shared_memory=allocate_shared_memory, NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout,
    SliceLayout=_Layout, BlockedLayout=_Layout, NVMMASharedLayout=_Layout,
)


# --------------------------------------------------------------------------------------------------------------
# Kernels and the module swap

class Kernel:
    """A kernel or a function kernels call: callable as it was, and launchable as kernel[grid](...)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for option in ("num_warps", "num_stages", "maxnreg", "num_ctas"):
                kwargs.pop(option, None)
            args = [pointer_to(a) if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: pointer_to(a) if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
            size = tuple(int(n) for n in (grid(kwargs) if callable(grid) else grid)) + (1, 1)
            for pid in itertools.product(*(range(n) for n in size[:3])):
                _state["failed"], _state["shared"] = False, 0
                _run(self.fn, args, kwargs, pid, size[:3])
        return launch


@contextlib.contextmanager
def emulate(module, sms: int = 3):
    """Inside the block, module's kernels run here: its language names (tl, gl, mbarrier, tma, ...) are the
    emulator's, its functions (and Triton's jitted ones) Kernels, its constexpr constants their values, and a GPU
    has `sms` multiprocessors (the persistent kernels' grid)."""
    saved = dict(module.__dict__)
    swap = dict(tl=lang, gl=lang, mbarrier=mbarrier, tma=tma, warpgroup_mma=warpgroup_mma,
                warpgroup_mma_wait=warpgroup_mma_wait, fence_async_shared=lambda *a, **k: None,
                _tma_load=_tma_load, _tma_store=_tma_store, _cta_barrier=lang.barrier, TensorDescriptor=Descriptor,
                GluonTensorDescriptor=Descriptor, HAS_TRITON=True, HAS_GLUON=True,
                triton=types.SimpleNamespace(cdiv=_cdiv))
    properties = torch.cuda.get_device_properties
    try:
        for name, value in saved.items():
            if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
                setattr(module, name, Kernel(value))
            elif hasattr(value, "fn") and type(value).__name__.endswith("JITFunction"):  # Triton installed
                setattr(module, name, Kernel(value.fn))
            elif type(value).__name__ == "constexpr":
                setattr(module, name, value.value)
        for name, value in swap.items():
            if name in saved:
                setattr(module, name, value)
        torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(multi_processor_count=sms)
        yield
    finally:
        torch.cuda.get_device_properties = properties
        module.__dict__.update(saved)
