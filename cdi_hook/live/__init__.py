"""The hook's side effects on a running container, one small module per step.

Nothing here decides what a device means (that is the plan's job); each module only
carries out its part of the plan, safely, inside an untrusted container rootfs.
"""
