"""Raw memory access, memory ordering and the few syscalls the data plane makes, as numba intrinsics.

Nothing else in vring emits fences or atomic accesses. Addresses are plain uint64 host
addresses that the caller has already validated against the memory it mapped: these
intrinsics do no checking of their own.

Why intrinsics: a plain numpy load in a spin loop is hoisted by LLVM (seen here: the loop
never returned), and guest memory shared with another process needs acquire loads for
indexes the other side publishes and release stores for the ones we publish.
Syscalls are declared by symbol name (resolved from libc at load time), which keeps
``cache=True`` working; ctypes function pointers would not.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8P = ir.IntType(8).as_pointer()
_WIDTH = {types.uint8: 8, types.uint16: 16, types.uint32: 32, types.uint64: 64, types.int64: 64}


def _loader(ty, ordering):
    bits = _WIDTH[ty]

    @intrinsic
    def load(typingctx, addr):
        sig = ty(types.uint64)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            if ordering is None:
                return builder.load(ptr, align=1)
            return builder.load_atomic(ptr, ordering, bits // 8)

        return sig, codegen

    return load


def _storer(ty, ordering):
    bits = _WIDTH[ty]

    @intrinsic
    def store(typingctx, addr, value):
        sig = types.void(types.uint64, ty)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            val = context.cast(builder, args[1], signature.args[1], ty)
            if ordering is None:
                builder.store(val, ptr, align=1)
            else:
                builder.store_atomic(val, ptr, ordering, bits // 8)
            return context.get_dummy_value()

        return sig, codegen

    return store


# plain accesses to guest memory (descriptors, used elements): each field read once into a local
load_u8 = _loader(types.uint8, None)
load_u16 = _loader(types.uint16, None)
load_u32 = _loader(types.uint32, None)
load_u64 = _loader(types.uint64, None)
store_u8 = _storer(types.uint8, None)
store_u16 = _storer(types.uint16, None)
store_u32 = _storer(types.uint32, None)
store_u64 = _storer(types.uint64, None)
# indexes the other side writes (avail idx, used idx, flags, event fields, control words)
load_u16_acquire = _loader(types.uint16, "acquire")
load_i64_acquire = _loader(types.int64, "acquire")
# indexes we publish (used idx): everything stored before is visible first
store_u16_release = _storer(types.uint16, "release")
store_i64_release = _storer(types.int64, "release")


@intrinsic
def atomic_or_u8(typingctx, addr, value):
    """*addr |= value as one atomic read-modify-write: the dirty log is shared with a front-end
    that reads and clears it concurrently (a plain OR could undo its clear or lose our bit)."""
    sig = types.void(types.uint64, types.uint8)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        builder.atomic_rmw("or", ptr, args[1], "monotonic")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence_seq_cst(typingctx):
    """Full barrier: orders our used-idx store before the used_event / flags load (EVENT_IDX)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence_release(typingctx):
    """Stores before this become visible before stores after it."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("release")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_bytes(typingctx, dst, src, n):
    """memcpy(dst, src, n) between validated host addresses."""
    sig = types.void(types.uint64, types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        d = builder.inttoptr(args[0], _I8P)
        s = builder.inttoptr(args[1], _I8P)
        cgutils.raw_memcpy(builder, d, s, args[2], 1)
        return context.get_dummy_value()

    return sig, codegen


def _syscall(name, ret_bits, arg_kinds):
    """A libc function taking ints and pointers (given as uint64 addresses)."""
    nb_args = tuple(types.int32 if k == "i32" else types.uint64 for k in arg_kinds)
    ir_args = [ir.IntType(32) if k == "i32" else (_I8P if k == "ptr" else ir.IntType(64)) for k in arg_kinds]
    ret = types.int64 if ret_bits == 64 else types.int32

    assert len(arg_kinds) == 3

    @intrinsic
    def call(typingctx, a0, a1, a2):
        sig = ret(*nb_args)

        def codegen(context, builder, signature, llargs):
            fnty = ir.FunctionType(ir.IntType(ret_bits), ir_args)
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            conv = [builder.inttoptr(a, _I8P) if k == "ptr" else a for a, k in zip(llargs, arg_kinds)]
            return builder.call(fn, conv)

        return sig, codegen

    return call


# ssize_t write(int fd, const void *buf, size_t n); read likewise
sys_write = _syscall("write", 64, ("i32", "ptr", "u64"))
sys_read = _syscall("read", 64, ("i32", "ptr", "u64"))
# int poll(struct pollfd *fds, nfds_t n, int timeout_ms)
sys_poll = _syscall("poll", 32, ("ptr", "u64", "i32"))


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (rdtsc on x86): cheap timing inside the data plane."""
    sig = types.uint64()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])

    return sig, codegen


def _prefetcher(rw):
    @intrinsic
    def prefetch(typingctx, addr):
        sig = types.void(types.uint64)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.VoidType(), [_I8P, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
            i32 = ir.IntType(32)
            builder.call(fn, [builder.inttoptr(args[0], _I8P), ir.Constant(i32, rw), ir.Constant(i32, 3),
                              ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    return prefetch


# hints to pull the cache line at an address close, for reading or for writing; they never fault
prefetch_read = _prefetcher(0)
prefetch_write = _prefetcher(1)


@intrinsic
def cpu_relax(typingctx):
    """x86 PAUSE: an empty poll backs off a little, so the front-end's core isn't asked for the
    shared ring lines at full speed (and a sibling hyperthread gets the pipeline)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen
