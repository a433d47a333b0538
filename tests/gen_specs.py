"""Generate a spec dir for the `cdi-hook validate` speed check: N files x M devices.

    python tests/gen_specs.py DIR [--files 1000] [--devices 10] [--format json|yaml]

Each device has a realistic set of edits (a device node, two mounts, env, a hook), so the
figure measures real validation work, not empty objects.
"""

from __future__ import annotations

import argparse
import json
import os


def spec_document(index: int, devices: int) -> dict:
    return {
        "cdiVersion": "0.6.0",
        "kind": f"vendor{index}.example.com/gpu",
        "containerEdits": {
            "env": [f"VENDOR{index}_VISIBLE=1"],
            "hooks": [{"hookName": "createContainer", "path": "/usr/bin/vendor-hook", "args": ["vendor-hook", "update"]}],
        },
        "devices": [
            {
                "name": f"gpu{d}",
                "annotations": {"example.com/slot": str(d)},
                "containerEdits": {
                    "env": [f"GPU_{d}=present"],
                    "deviceNodes": [{"path": f"/dev/vendor{index}/gpu{d}", "type": "c", "major": 195, "minor": d,
                                     "permissions": "rw", "fileMode": 0o660}],
                    "mounts": [
                        {"hostPath": f"/usr/lib/vendor{index}/libgpu.so.{d}", "containerPath": f"/usr/lib/libgpu.so.{d}",
                         "options": ["ro", "nosuid", "nodev", "bind"]},
                        {"hostPath": f"/var/lib/vendor{index}/fw{d}", "containerPath": f"/lib/firmware/fw{d}",
                         "options": ["ro", "bind"]},
                    ],
                },
            }
            for d in range(devices)
        ],
    }


def generate(directory: str, files: int = 1000, devices: int = 10, fmt: str = "json") -> None:
    os.makedirs(directory, exist_ok=True)
    for index in range(files):
        document = spec_document(index, devices)
        path = os.path.join(directory, f"vendor{index}.{fmt}")
        with open(path, "w") as out:
            if fmt == "yaml":
                import yaml

                yaml.safe_dump(document, out, sort_keys=False)
            else:
                json.dump(document, out, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--format", choices=("json", "yaml"), default="json")
    args = parser.parse_args()
    generate(args.directory, args.files, args.devices, args.format)


if __name__ == "__main__":
    main()
