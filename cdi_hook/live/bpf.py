"""eBPF for the cgroup v2 device controller: the bpf(2) calls we need, and our program prologue.

Under cgroup v2 a runtime restricts devices with a BPF_PROG_TYPE_CGROUP_DEVICE program
attached to the container's cgroup. To allow more devices we read the attached program
back from the kernel (its "xlated" instructions), put a short prologue in front of it that
returns "allow" for exactly our devices, and falls through to the untouched original code
for everything else, so every rule of the runtime keeps working.

The prologue starts with a marker and its own length, so a later run recognises it, takes
its rules over and rebuilds from the original code instead of stacking prologues.

Only what the device program needs is here: ctypes and the raw bpf_attr layouts of
<linux/bpf.h>, each syscall a small function raising OSError.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections import namedtuple
from collections.abc import Iterable, Sequence

# --- instruction encoding ---------------------------------------------------------------

# Opcodes (class | op | source) used by the prologue and recognised by the decoder.
LDX_MEM_W = 0x61     # dst = *(u32 *)(src + off)
ALU32_AND_K = 0x54   # w_dst &= imm
ALU32_RSH_K = 0x74   # w_dst >>= imm
ALU32_MOV_K = 0xB4   # w_dst = imm
ALU32_MOV_X = 0xBC   # w_dst = w_src
JMP_JNE_K = 0x55     # if dst != imm goto pc + off
JMP_EXIT = 0x95
JMP_CALL = 0x85
LD_IMM64 = 0x18      # two-slot 64-bit immediate load (maps, when src_reg != 0)

R0, R1, R2, R3, R4, R5 = range(6)

_INSN = struct.Struct("<BBhi" if sys.byteorder == "little" else ">BBhi")


class Insn(namedtuple("Insn", ["code", "dst", "src", "off", "imm"], defaults=(0, 0, 0, 0))):
    """One struct bpf_insn."""

    __slots__ = ()

    def encode(self) -> bytes:
        # The two 4-bit register fields share one byte; C bitfield order follows endianness.
        regs = (self.src << 4 | self.dst) if sys.byteorder == "little" else (self.dst << 4 | self.src)
        return _INSN.pack(self.code, regs, self.off, self.imm)


def encode_program(insns: Iterable[Insn]) -> bytes:
    return b"".join(insn.encode() for insn in insns)


def decode_program(raw: bytes) -> list[Insn]:
    if len(raw) % _INSN.size:
        raise ValueError(f"BPF program of {len(raw)} bytes is not a whole number of instructions")
    insns = []
    for code, regs, off, imm in _INSN.iter_unpack(raw):
        dst, src = (regs & 0xF, regs >> 4) if sys.byteorder == "little" else (regs >> 4, regs & 0xF)
        insns.append(Insn(code, dst, src, off, imm))
    return insns


# --- the device prologue ----------------------------------------------------------------

# struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }
# access_type = (BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_*
DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
ACC_ALL = ACC_MKNOD | ACC_READ | ACC_WRITE

PROLOGUE_MARKER = 0x43444948  # "CDIH": a store into r0 that the code overwrites right away
_HEADER_LEN = 8               # marker, length, four context loads (six instructions) ...
_BLOCK_LEN = 8                # ... then one block of this size per allowed device


# One device the prologue allows, in the kernel's numbers (DEV_*, ACC_* bit mask); sorts by its fields.
DeviceAllow = namedtuple("DeviceAllow", ["dev_type", "major", "minor", "access"])


def merge_allows(allows: Iterable[DeviceAllow]) -> list[DeviceAllow]:
    """One entry per device with the union of its access bits, in a stable order.

    One block per device also keeps every branch of the prologue reachable: the verifier
    removes branches it proves dead, which would make the loaded code differ from ours.
    """
    access: dict[tuple[int, int, int], int] = {}
    for allow in allows:
        key = (allow.dev_type, allow.major, allow.minor)
        access[key] = access.get(key, 0) | allow.access
    return sorted(DeviceAllow(*key, bits) for key, bits in access.items())


def build_prologue(allows: Sequence[DeviceAllow]) -> list[Insn]:
    """Instructions that return 1 for the given devices and fall through otherwise.

    Only r0 and r2-r5 are used: the original program starts right after us and expects
    r1 = context, exactly as at program entry.
    """
    allows = merge_allows(allows)
    length = _HEADER_LEN + _BLOCK_LEN * len(allows)
    insns = [
        Insn(ALU32_MOV_K, R0, imm=PROLOGUE_MARKER),
        Insn(ALU32_MOV_K, R0, imm=length),
        Insn(LDX_MEM_W, R2, R1, 0),           # r2 = device type
        Insn(ALU32_AND_K, R2, imm=0xFFFF),
        Insn(LDX_MEM_W, R3, R1, 0),           # r3 = requested access bits
        Insn(ALU32_RSH_K, R3, imm=16),
        Insn(LDX_MEM_W, R4, R1, 4),           # r4 = major
        Insn(LDX_MEM_W, R5, R1, 8),           # r5 = minor
    ]
    for allow in allows:
        # Every "no" jumps to the start of the next block (or of the original code).
        insns += [
            Insn(JMP_JNE_K, R2, off=7, imm=allow.dev_type),
            Insn(JMP_JNE_K, R4, off=6, imm=allow.major),
            Insn(JMP_JNE_K, R5, off=5, imm=allow.minor),
            Insn(ALU32_MOV_X, R0, R3),
            Insn(ALU32_AND_K, R0, imm=~allow.access & 0xFFFF),  # access bits not granted
            Insn(JMP_JNE_K, R0, off=2, imm=0),
            Insn(ALU32_MOV_K, R0, imm=1),
            Insn(JMP_EXIT),
        ]
    return insns


def split_prologue(insns: Sequence[Insn]) -> tuple[list[DeviceAllow], list[Insn]]:
    """(devices our prologue allows, original code); ([], insns) when there is no prologue of ours.

    A prologue is ours only when rebuilding it from the devices it names gives exactly the
    same instructions, so foreign code that happens to start with the marker is left whole.
    """
    if (len(insns) < _HEADER_LEN or insns[0] != Insn(ALU32_MOV_K, R0, imm=PROLOGUE_MARKER)
            or insns[1].code != ALU32_MOV_K or insns[1].dst != R0):
        return [], list(insns)
    length = insns[1].imm
    if length < _HEADER_LEN or (length - _HEADER_LEN) % _BLOCK_LEN or length > len(insns):
        return [], list(insns)
    allows = []
    for start in range(_HEADER_LEN, length, _BLOCK_LEN):
        block = insns[start:start + _BLOCK_LEN]
        allows.append(DeviceAllow(block[0].imm, block[1].imm, block[2].imm, ~block[4].imm & ACC_ALL))
    if build_prologue(allows) != list(insns[:length]):
        return [], list(insns)
    return allows, list(insns[length:])


def extend_program(insns: Sequence[Insn], allows: Iterable[DeviceAllow]) -> list[Insn]:
    """The program that also allows `allows`: one prologue (old and new devices) + original code."""
    previous, original = split_prologue(insns)
    return build_prologue(merge_allows([*previous, *allows])) + original


def already_allows(insns: Sequence[Insn], allows: Iterable[DeviceAllow]) -> bool:
    """True when our prologue in `insns` grants every device and access bit of `allows`."""
    previous = {(a.dev_type, a.major, a.minor): a.access for a in split_prologue(insns)[0]}
    return all(previous.get((a.dev_type, a.major, a.minor), 0) & a.access == a.access
               for a in allows)


def reloadable_problem(insns: Sequence[Insn]) -> str | None:
    """Why the kernel's dump of a program cannot be loaded again, or None.

    The xlated dump rewrites helper calls (imm becomes a kernel offset) and maps (ids
    instead of fds); runtimes' device programs use neither, but others might.
    """
    for index, insn in enumerate(insns):
        if insn.code == JMP_CALL:
            return f"the attached program calls a BPF helper or function (instruction {index})"
        if insn.code == LD_IMM64 and insn.src != 0:
            return f"the attached program uses a BPF map (instruction {index})"
        if insn.dst > 10 or insn.src > 10:
            return (f"the kernel rewrote the attached program (constant blinding, instruction {index}); "
                    "is net.core.bpf_jit_harden 2?")
    return None


# --- bpf(2) -----------------------------------------------------------------------------

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6

BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "ppc64": 361,
           "s390x": 351, "i686": 357, "i386": 357, "armv7l": 386, "loongarch64": 280}

# Large enough for every command we use; the kernel wants any bytes past its fields zero.
_ATTR_SIZE = 128

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    machine = os.uname().machine  # what platform.machine() says, without importing it (~2 ms)
    nr = _NR_BPF.get(machine)
    if nr is None:
        raise OSError(f"bpf(2): unknown syscall number on {machine}")
    result = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _attr(layout: str, *values: int | bytes) -> ctypes.Array:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=" + layout, attr, 0, *values)
    return attr


def _address(buffer: ctypes.Array) -> int:
    return ctypes.addressof(buffer)


def prog_query(target_fd: int, attach_type: int) -> tuple[int, list[int]]:
    """(attach flags, ids of the programs attached directly to this cgroup)."""
    capacity = 16
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        # target_fd, attach_type, query_flags, attach_flags, prog_ids (u64), prog_cnt
        attr = _attr("IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), capacity)
        try:
            _bpf(BPF_PROG_QUERY, attr)
        except OSError as e:
            if e.errno == 28 and capacity < 4096:  # ENOSPC: more programs than room
                capacity *= 4
                continue
            raise
        attach_flags = struct.unpack_from("=I", attr, 12)[0]
        count = struct.unpack_from("=I", attr, 24)[0]
        return attach_flags, list(ids[:count])


def prog_get_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _attr("I", prog_id))


ProgInfo = namedtuple("ProgInfo", ["prog_type", "prog_id", "name", "gpl_compatible", "insns"])  # insns: list[Insn]


# struct bpf_prog_info up to and including the gpl_compatible bitfield word.
_INFO_LEN = 88


def prog_info(prog_fd: int) -> ProgInfo:
    """The program's type, id, name, license class and xlated instructions."""
    info = ctypes.create_string_buffer(_INFO_LEN)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("IIQ", prog_fd, _INFO_LEN, _address(info)))
    xlated_len = struct.unpack_from("=I", info, 20)[0]
    insns_buffer = ctypes.create_string_buffer(max(xlated_len, 1))
    info = ctypes.create_string_buffer(_INFO_LEN)
    struct.pack_into("=I", info, 20, xlated_len)
    struct.pack_into("=Q", info, 32, _address(insns_buffer))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr("IIQ", prog_fd, _INFO_LEN, _address(info)))
    prog_type, prog_id = struct.unpack_from("=II", info, 0)
    xlated_len = min(xlated_len, struct.unpack_from("=I", info, 20)[0])
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    flags_word = struct.unpack_from("=I", info, 84)[0]
    gpl_bit = 1 if sys.byteorder == "little" else 1 << 31
    return ProgInfo(prog_type, prog_id, name, bool(flags_word & gpl_bit),
                    decode_program(insns_buffer.raw[:xlated_len]))


class ProgLoadError(OSError):
    """BPF_PROG_LOAD refused the program; `log` holds the verifier's explanation."""

    def __init__(self, err: int, log: str):
        super().__init__(err, os.strerror(err))
        self.log = log


def prog_load(prog_type: int, insns: Sequence[Insn], license: str, name: str = "") -> int:
    """Load a program; on refusal load it again with the verifier log on, to say why."""
    code = ctypes.create_string_buffer(encode_program(insns))
    license_buffer = ctypes.create_string_buffer(license.encode())
    name_bytes = name.encode()[:15]

    def load(log_buffer: ctypes.Array | None) -> int:
        log_level, log_size, log_address = (1, len(log_buffer), _address(log_buffer)) if log_buffer else (0, 0, 0)
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
        # prog_flags, prog_name[16]
        attr = _attr("IIQQIIQII16s", prog_type, len(insns), _address(code), _address(license_buffer),
                     log_level, log_size, log_address, 0, 0, name_bytes)
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return load(None)
    except OSError as first:
        log_buffer = ctypes.create_string_buffer(1 << 20)
        try:
            return load(log_buffer)
        except OSError as second:
            err = second.errno or first.errno
            if err is None:  # not the kernel refusing the program: no bpf(2) on this machine
                raise
            raise ProgLoadError(err, log_buffer.value.decode(errors="replace")) from None


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int, replace_fd: int = 0) -> None:
    # target_fd, attach_bpf_fd, attach_type, attach_flags, replace_bpf_fd
    _bpf(BPF_PROG_ATTACH, _attr("IIIII", target_fd, prog_fd, attach_type, flags, replace_fd))
