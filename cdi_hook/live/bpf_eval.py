"""What a device cgroup's eBPF programs answer for one request, without asking the kernel.

`cdi-hook verify` under cgroup v2 needs the true answer of the programs attached to a
container's cgroup: the runtime's, with cdi-hook's prologue in front or not. Opening the
device to find out would have effects (a tape rewinds, a GPU initialises), and the kernel
has no "would you allow" call for device programs. So the instructions the kernel reports
(the xlated code: what it really runs) are run here, on the request the kernel would pass.
Such programs use a small part of eBPF (no maps, no helpers, no stack): only that part is
known, and anything else is an error, never a guess. Pure code, no system calls: unit
tested in tests/test_bpf_eval.py, and against the kernel in tests/test_running_cgroup2.py.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Sequence

    from cdi_hook.live.bpf import Insn


def run_device_program(insns: Sequence[Insn], access_type: int, major: int, minor: int, max_steps: int = 100000) -> int:
    """Run a BPF_PROG_TYPE_CGROUP_DEVICE program on one request, as the kernel would: the
    context is struct bpf_cgroup_dev_ctx {u32 access_type, major, minor}. Only the
    instructions such programs use (ALU, ALU64, JMP, JMP32, loads from the context) are
    known; anything else is a ValueError, never a guess."""
    # The kernel's struct, in the host's byte order (as bpf.py encodes instructions).
    ctx = b"".join(value.to_bytes(4, sys.byteorder) for value in (access_type, major, minor))
    regs = [0] * 11
    regs[1] = -1  # the context pointer: only loads through it are allowed
    pc = 0
    for _ in range(max_steps):
        if not 0 <= pc < len(insns):
            raise ValueError(f"jump out of the program (instruction {pc})")
        insn = insns[pc]
        cls, op, use_reg = insn.code & 0x07, insn.code & 0xF0, insn.code & 0x08
        if cls == 0x01:  # LDX
            size = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[insn.code & 0x18]
            if insn.code & 0xE0 != 0x60 or regs[insn.src] != -1 or not 0 <= insn.off <= len(ctx) - size:
                raise ValueError(f"load not from the device context (instruction {pc})")
            regs[insn.dst] = int.from_bytes(ctx[insn.off:insn.off + size], sys.byteorder)
        elif cls in (0x04, 0x07):  # ALU (32 bit), ALU64
            width = 32 if cls == 0x04 else 64
            mask = (1 << width) - 1
            a = regs[insn.dst] & mask
            b = (regs[insn.src] if use_reg else insn.imm) & mask
            if op == 0xB0 and use_reg and cls == 0x07 and regs[insn.src] == -1:
                regs[insn.dst] = -1  # a copy of the context pointer
                pc += 1
                continue
            regs[insn.dst] = _alu(op, a, b, width, pc) & mask
        elif cls in (0x05, 0x06):  # JMP, JMP32
            if op == 0x90:  # EXIT
                return regs[0] & 0xFFFFFFFF
            if op == 0x80:
                raise ValueError(f"helper call (instruction {pc})")
            width = 32 if cls == 0x06 else 64
            mask = (1 << width) - 1
            a = regs[insn.dst] & mask
            b = (regs[insn.src] if use_reg else insn.imm) & mask
            if op == 0x00 or _jump(op, a, b, width, pc):
                pc += insn.off
        else:
            raise ValueError(f"opcode {insn.code:#x} (instruction {pc})")
        pc += 1
    raise ValueError("the program does not end")


def _signed(value: int, width: int) -> int:
    return value - (1 << width) if value >> (width - 1) else value


def _alu(op: int, a: int, b: int, width: int, pc: int) -> int:
    if op == 0x00:
        return a + b
    if op == 0x10:
        return a - b
    if op == 0x20:
        return a * b
    if op == 0x30:
        return a // b if b else 0
    if op == 0x40:
        return a | b
    if op == 0x50:
        return a & b
    if op == 0x60:
        return a << (b & (width - 1))
    if op == 0x70:
        return a >> (b & (width - 1))
    if op == 0x80:
        return -a
    if op == 0x90:
        return a % b if b else a
    if op == 0xA0:
        return a ^ b
    if op == 0xB0:
        return b
    if op == 0xC0:
        return _signed(a, width) >> (b & (width - 1))
    raise ValueError(f"ALU operation {op:#x} (instruction {pc})")


def _jump(op: int, a: int, b: int, width: int, pc: int) -> bool:
    sa, sb = _signed(a, width), _signed(b, width)
    table = {0x10: a == b, 0x20: a > b, 0x30: a >= b, 0x40: bool(a & b), 0x50: a != b, 0x60: sa > sb,
             0x70: sa >= sb, 0xA0: a < b, 0xB0: a <= b, 0xC0: sa < sb, 0xD0: sa <= sb}
    if op not in table:
        raise ValueError(f"jump operation {op:#x} (instruction {pc})")
    return table[op]
