"""The device-program evaluator of `cdi-hook verify` (live/bpf_eval.py): runc-shaped programs,
cdi-hook's prologue in front of them, eBPF's 32/64-bit and signed/unsigned rules, and a
ValueError (never a guess) for whatever a device program does not do. Against the kernel:
tests/test_running_cgroup2.py::test_device_program_interpreter_agrees_with_the_kernel."""

from __future__ import annotations

import pytest

from cdi_hook.live import bpf
from cdi_hook.live.bpf import ACC_MKNOD, ACC_READ, ACC_WRITE, DEV_BLOCK, DEV_CHAR, DeviceAllow, Insn, R0, R1, R2
from cdi_hook.live.bpf_eval import run_device_program
from test_bpf import RUNC_LIKE  # allows c 1:3 rwm, denies the rest

RWM = ACC_MKNOD | ACC_READ | ACC_WRITE
EXIT = Insn(0x95)


def allowed(program, dev_type, major, minor, access) -> bool:
    return run_device_program(program, dev_type | access << 16, major, minor) == 1


def test_a_runc_shaped_program():
    assert allowed(RUNC_LIKE, DEV_CHAR, 1, 3, ACC_READ | ACC_WRITE)
    assert not allowed(RUNC_LIKE, DEV_CHAR, 1, 4, ACC_READ)
    assert not allowed(RUNC_LIKE, DEV_BLOCK, 1, 3, ACC_READ)


def test_the_prologue_in_front_allows_exactly_its_devices_and_access():
    program = bpf.build_prologue([DeviceAllow(DEV_CHAR, 10, 232, ACC_READ | ACC_WRITE),
                                  DeviceAllow(DEV_BLOCK, 7, 0, RWM)]) + RUNC_LIKE
    assert allowed(program, DEV_CHAR, 10, 232, ACC_READ)
    assert allowed(program, DEV_CHAR, 10, 232, ACC_READ | ACC_WRITE)
    assert not allowed(program, DEV_CHAR, 10, 232, ACC_MKNOD)  # not asked for
    assert not allowed(program, DEV_BLOCK, 10, 232, ACC_READ)  # another type
    assert allowed(program, DEV_BLOCK, 7, 0, ACC_MKNOD)
    assert not allowed(program, DEV_BLOCK, 7, 1, ACC_READ)
    assert allowed(program, DEV_CHAR, 1, 3, RWM)  # the runtime's own code still runs after it


def test_widths_and_signedness():
    minus_one_64 = [Insn(0xB7, R2, imm=-1)]  # mov64: sign-extended, all 64 bits set
    # signed: -1 > 0 is false; unsigned: 2**64 - 1 > 0 is true
    signed = minus_one_64 + [Insn(0xB7, R0, imm=0), Insn(0x65, R2, off=1, imm=0), Insn(0xB7, R0, imm=1), EXIT]
    unsigned = minus_one_64 + [Insn(0xB7, R0, imm=1), Insn(0x25, R2, off=1, imm=0), Insn(0xB7, R0, imm=0), EXIT]
    assert run_device_program(signed, 0, 0, 0) == 1
    assert run_device_program(unsigned, 0, 0, 0) == 1
    # add32 wraps at 32 bits and clears the upper half; add64 does not wrap
    assert run_device_program([Insn(0xB4, R0, imm=-1), Insn(0x04, R0, imm=2), EXIT], 0, 0, 0) == 1
    carried = [Insn(0xB4, R0, imm=-1), Insn(0x07, R0, imm=2), Insn(0x77, R0, imm=32), EXIT]  # (2**32 + 1) >> 32
    assert run_device_program(carried, 0, 0, 0) == 1
    # division by zero gives 0, modulo by zero keeps the dividend (eBPF's rules, not an error)
    assert run_device_program([Insn(0xB7, R0, imm=7), Insn(0x37, R0, imm=0), EXIT], 0, 0, 0) == 0
    assert run_device_program([Insn(0xB7, R0, imm=7), Insn(0x97, R0, imm=0), EXIT], 0, 0, 0) == 7
    # the context: access_type, major, minor as u32, in that order
    assert run_device_program([Insn(0x61, R0, R1, 8), EXIT], 0, 5, 9) == 9


@pytest.mark.parametrize("program, error", [
    ([Insn(0x85, imm=1), EXIT], "helper call"),
    ([Insn(0x62, R1, off=0, imm=1), EXIT], "opcode 0x62"),  # a store
    ([Insn(0x18, R0, imm=1), Insn(0), EXIT], "opcode 0x18"),  # a 64-bit immediate load (maps)
    ([Insn(0x61, R0, R2, 0), EXIT], "load not from the device context"),
    ([Insn(0x61, R0, R1, 12), EXIT], "load not from the device context"),  # past the struct
    ([Insn(0x05, off=5), EXIT], "jump out of the program"),
    ([Insn(0x05, off=-1)], "does not end"),
    ([Insn(0xB7, R0, imm=1)], "jump out of the program"),  # runs off the end
    ([Insn(0xD4, R0, imm=16), EXIT], "ALU operation 0xd0"),  # byte swap
])
def test_what_it_does_not_know_is_an_error(program, error):
    with pytest.raises(ValueError, match=error):
        run_device_program(program, DEV_CHAR | ACC_READ << 16, 1, 3)
