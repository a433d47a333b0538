"""The device-program assembler: encoding, the prologue's meaning, recognising our own prologue.

The prologue's meaning is checked with a tiny interpreter of the few opcodes runtimes'
device programs use, running our prologue in front of a program shaped like runc's.
One test (root) loads a program into the kernel and reads it back.
"""

from __future__ import annotations

import os

import pytest

from cdi_hook.live import bpf
from cdi_hook.live.bpf import (ACC_MKNOD, ACC_READ, ACC_WRITE, DEV_BLOCK, DEV_CHAR, DeviceAllow, Insn,
                               R0, R1, R2, R3, R4, R5)
from conftest import require_root

RWM = ACC_MKNOD | ACC_READ | ACC_WRITE

# runc 1.1's shape: load type/access/major/minor, one block per rule, deny at the end.
# This one allows only c 1:3 (rwm) and uses r1 as a scratch register, as runc does.
RUNC_LIKE = [
    Insn(0x61, R2, R1, 0), Insn(0x54, R2, imm=0xFFFF),
    Insn(0x61, R3, R1, 0), Insn(0x74, R3, imm=16),
    Insn(0x61, R4, R1, 4), Insn(0x61, R5, R1, 8),
    Insn(0x55, R2, off=7, imm=DEV_CHAR),
    Insn(0x55, R4, off=6, imm=1),
    Insn(0x55, R5, off=5, imm=3),
    Insn(0xBC, R1, R3), Insn(0x54, R1, imm=RWM), Insn(0x5D, R1, R3, off=2),
    Insn(0xB4, R0, imm=1), Insn(0x95),
    Insn(0xB4, R0, imm=0), Insn(0x95),
]


def run(program: list[Insn], dev_type: int, major: int, minor: int, access: int) -> int:
    """Interpret the opcodes of device programs on one bpf_cgroup_dev_ctx; returns r0."""
    ctx = [access << 16 | dev_type, major, minor]
    regs = [0] * 11
    regs[R1] = "ctx"  # a pointer: any arithmetic on it would fail loudly
    pc = 0
    for _ in range(10_000):
        insn = program[pc]
        pc += 1
        src_val = insn.imm & 0xFFFFFFFF if insn.code in (0x54, 0x74, 0xB4) else None
        if insn.code == 0x61:
            assert regs[insn.src] == "ctx", "context pointer clobbered"
            regs[insn.dst] = ctx[insn.off // 4]
        elif insn.code == 0x54:
            regs[insn.dst] = (regs[insn.dst] & src_val) & 0xFFFFFFFF
        elif insn.code == 0x74:
            regs[insn.dst] = (regs[insn.dst] & 0xFFFFFFFF) >> src_val
        elif insn.code == 0xB4:
            regs[insn.dst] = src_val
        elif insn.code == 0xBC:
            regs[insn.dst] = regs[insn.src] & 0xFFFFFFFF
        elif insn.code == 0x55:
            if regs[insn.dst] != insn.imm:
                pc += insn.off
        elif insn.code == 0x5D:
            if regs[insn.dst] != regs[insn.src]:
                pc += insn.off
        elif insn.code == 0x95:
            return regs[R0]
        else:
            raise AssertionError(f"opcode {insn.code:#x} not interpreted")
    raise AssertionError("program did not terminate")


# --- encoding ---------------------------------------------------------------------------

def test_instruction_encoding_matches_struct_bpf_insn():
    assert Insn(0x61, R4, R1, 4).encode() == bytes([0x61, 0x14, 4, 0, 0, 0, 0, 0])
    assert Insn(0x55, R2, off=7, imm=2).encode() == bytes([0x55, 0x02, 7, 0, 2, 0, 0, 0])
    assert Insn(0x54, R0, imm=-8).encode() == bytes([0x54, 0x00, 0, 0, 0xF8, 0xFF, 0xFF, 0xFF])
    assert Insn(0x05, off=-1).encode() == bytes([0x05, 0x00, 0xFF, 0xFF, 0, 0, 0, 0])


def test_decode_is_the_inverse_of_encode():
    program = bpf.build_prologue([DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ)]) + RUNC_LIKE
    assert bpf.decode_program(bpf.encode_program(program)) == program


def test_decode_refuses_a_partial_instruction():
    with pytest.raises(ValueError):
        bpf.decode_program(b"\x95" * 7)


# --- what the prologue allows -----------------------------------------------------------

def test_prologue_allows_exactly_its_devices_and_keeps_the_original_rules():
    program = bpf.extend_program(RUNC_LIKE, [DeviceAllow(DEV_CHAR, 10, 232, RWM),
                                             DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ | ACC_WRITE)])
    assert run(program, DEV_CHAR, 10, 232, ACC_READ | ACC_WRITE) == 1
    assert run(program, DEV_CHAR, 10, 232, ACC_MKNOD) == 1
    assert run(program, DEV_BLOCK, 7, 0, ACC_READ | ACC_WRITE) == 1
    assert run(program, DEV_BLOCK, 7, 0, ACC_MKNOD) == 0, "m was not granted"
    assert run(program, DEV_BLOCK, 7, 1, ACC_READ) == 0, "another minor"
    assert run(program, DEV_CHAR, 7, 0, ACC_READ) == 0, "same numbers, other type"
    assert run(program, DEV_BLOCK, 10, 232, ACC_READ) == 0, "same numbers, other type"
    # The runtime's own rule still holds (original code reached with r1 intact) ...
    assert run(program, DEV_CHAR, 1, 3, RWM) == 1
    # ... and so does its default deny.
    assert run(program, DEV_CHAR, 1, 5, ACC_READ) == 0


def test_read_only_rule_refuses_write():
    program = bpf.extend_program(RUNC_LIKE, [DeviceAllow(DEV_BLOCK, 7, 2, ACC_READ)])
    assert run(program, DEV_BLOCK, 7, 2, ACC_READ) == 1
    assert run(program, DEV_BLOCK, 7, 2, ACC_WRITE) == 0
    assert run(program, DEV_BLOCK, 7, 2, ACC_READ | ACC_WRITE) == 0


def test_every_prologue_jump_lands_inside_the_program():
    program = bpf.extend_program(RUNC_LIKE, [DeviceAllow(DEV_CHAR, 10, 232, RWM),
                                             DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ)])
    prologue_len = len(program) - len(RUNC_LIKE)
    for pc, insn in enumerate(program[:prologue_len]):
        if insn.code == 0x55:
            target = pc + 1 + insn.off
            # a block's "no" goes to the next block, or to the original code's first instruction
            assert target <= prologue_len and target % 8 == 0


# --- recognising our prologue -----------------------------------------------------------

def test_split_prologue_recovers_devices_and_original():
    allows = [DeviceAllow(DEV_CHAR, 10, 232, RWM), DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ)]
    found, original = bpf.split_prologue(bpf.build_prologue(allows) + RUNC_LIKE)
    assert sorted(found) == sorted(allows)
    assert original == RUNC_LIKE


def test_foreign_program_is_not_taken_for_ours():
    assert bpf.split_prologue(RUNC_LIKE) == ([], RUNC_LIKE)
    # The marker alone is not enough: the rest must be exactly what we would build.
    forged = bpf.build_prologue([DeviceAllow(DEV_CHAR, 10, 232, RWM)]) + RUNC_LIKE
    forged[9] = Insn(0x55, R4, off=5, imm=10)  # a jump that no longer matches our layout
    assert bpf.split_prologue(forged) == ([], forged)
    too_long = [Insn(0xB4, R0, imm=bpf.PROLOGUE_MARKER), Insn(0xB4, R0, imm=1000)] + RUNC_LIKE
    assert bpf.split_prologue(too_long) == ([], too_long)


def test_extending_twice_does_not_stack_prologues():
    first = bpf.extend_program(RUNC_LIKE, [DeviceAllow(DEV_CHAR, 10, 232, ACC_READ)])
    second = bpf.extend_program(first, [DeviceAllow(DEV_CHAR, 10, 232, ACC_WRITE),
                                        DeviceAllow(DEV_BLOCK, 7, 0, RWM)])
    assert second == bpf.build_prologue([DeviceAllow(DEV_CHAR, 10, 232, ACC_READ | ACC_WRITE),
                                         DeviceAllow(DEV_BLOCK, 7, 0, RWM)]) + RUNC_LIKE
    assert bpf.extend_program(second, [DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ)]) == second


def test_already_allows_compares_access_bits():
    program = bpf.extend_program(RUNC_LIKE, [DeviceAllow(DEV_CHAR, 10, 232, ACC_READ | ACC_WRITE)])
    assert bpf.already_allows(program, [DeviceAllow(DEV_CHAR, 10, 232, ACC_READ)])
    assert not bpf.already_allows(program, [DeviceAllow(DEV_CHAR, 10, 232, ACC_MKNOD)])
    assert not bpf.already_allows(program, [DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ)])
    assert not bpf.already_allows(RUNC_LIKE, [DeviceAllow(DEV_CHAR, 1, 3, ACC_READ)])


def test_programs_using_helpers_or_maps_are_refused():
    assert bpf.reloadable_problem(RUNC_LIKE) is None
    assert "helper" in bpf.reloadable_problem(RUNC_LIKE[:2] + [Insn(0x85, imm=14)] + RUNC_LIKE[2:])
    assert "map" in bpf.reloadable_problem([Insn(0x18, R1, src=1, imm=5), Insn(0)] + RUNC_LIKE)
    blinded = [Insn(0xB4, 11, imm=7)] + RUNC_LIKE  # BPF_REG_AX only appears after constant blinding
    assert "blinding" in bpf.reloadable_problem(blinded)


# --- the kernel -------------------------------------------------------------------------

def test_kernel_accepts_the_program_and_its_dump_is_recognised():
    require_root()
    program = bpf.extend_program(RUNC_LIKE, [DeviceAllow(DEV_CHAR, 10, 232, RWM),
                                             DeviceAllow(DEV_BLOCK, 7, 0, ACC_READ)])
    fd = bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program, "Apache", "cdi_hook_test")
    try:
        info = bpf.prog_info(fd)
    finally:
        os.close(fd)
    assert info.prog_type == bpf.BPF_PROG_TYPE_CGROUP_DEVICE
    assert info.name == "cdi_hook_test"
    assert not info.gpl_compatible
    assert info.insns == program, "the verifier rewrote our code: recognition would fail"
    assert bpf.split_prologue(info.insns)[1] == RUNC_LIKE


def test_kernel_refusal_carries_the_verifier_log():
    require_root()
    clobbers_r1 = [Insn(0xB4, R1, imm=0)] + RUNC_LIKE  # the context pointer overwritten
    with pytest.raises(bpf.ProgLoadError) as refused:
        bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, clobbers_r1, "Apache")
    assert "R1" in refused.value.log
