"""The innermost loops of each kernel in an object file, from its SASS: how many
instructions a trip takes, how many of them are fused multiply-adds, and how many are
tensor-core matrix multiply-adds (HMMA).

Without a GPU this is the one way to see what a kernel's hot loop costs: an FFMA-bound
loop runs at most at (FMAs / instructions) of the multiprocessor's FMA rate, since one
warp scheduler issues one instruction a cycle.

    KEEP=1 bash tools/check_cuda_compile.sh        # prints the folder it kept
    python tools/sass_loops.py /tmp/pconv_cuda_check.XXXX/few_outputs.o --match forward

Needs ``cuobjdump`` and ``nvdisasm`` on PATH (the CUDA toolkit, or the wheels
``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

_FUNCTION = re.compile(r"Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
FMA_OPCODES = ("FFMA", "DFMA", "HFMA2")
MMA_OPCODES = ("HMMA",)  # tensor-core matrix multiply-adds


@dataclass
class Loop:
    start: int  # address of the first instruction of the body
    end: int    # address of the backward branch
    opcodes: Counter

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    @property
    def fmas(self) -> int:
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] in FMA_OPCODES)

    @property
    def mmas(self) -> int:
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] in MMA_OPCODES)


def parse(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """Function name -> [(address, opcode, operands)] in address order."""
    functions: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in sass.splitlines():
        found = _FUNCTION.search(line)
        if found:
            current = functions.setdefault(found.group(1), [])
            continue
        found = _INSTRUCTION.search(line)
        if found and current is not None:
            current.append((int(found.group(1), 16), found.group(3), found.group(4)))
    return functions


def innermost_loops(code: list[tuple[int, str, str]]) -> list[Loop]:
    """The loops (a backward branch and the code from its target to it) that hold no other
    loop, in address order."""
    spans = []
    for address, opcode, operands in code:
        if opcode.startswith("BRA"):
            target = _BRANCH_TARGET.search(operands)
            if target and int(target.group(1), 16) <= address:
                spans.append((int(target.group(1), 16), address))
    inner = [s for s in spans
             if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for start, end in sorted(set(inner)):
        ops = Counter(op for a, op, _ in code if start <= a <= end)
        loops.append(Loop(start, end, ops))
    return loops


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("object", help="an object file or cubin with sm_XX code")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--match", default="", help="only kernels whose name contains this")
    parser.add_argument("--top", type=int, default=1,
                        help="loops shown per kernel, most FMAs first")
    parser.add_argument("--all", action="store_true",
                        help="also the loops without a fused multiply-add (staging, say)")
    args = parser.parse_args(argv)
    sass = subprocess.run(["cuobjdump", "-arch", args.arch, "-sass", args.object],
                          capture_output=True, text=True)
    if sass.returncode != 0:
        print(sass.stderr.strip(), file=sys.stderr)
        return 1
    functions = parse(sass.stdout)
    names = demangle(sorted(functions))
    for mangled in sorted(functions, key=lambda n: names[n]):
        name = names[mangled]
        if args.match not in name:
            continue
        loops = sorted(innermost_loops(functions[mangled]),
                       key=lambda l: (-l.mmas, -l.fmas, -l.instructions))
        loops = [l for l in loops if l.fmas or l.mmas or args.all][: args.top]
        print(name.split("(")[0].removeprefix("void pconv::cuda::"))
        if not loops:
            print("    no loop with a fused multiply-add")
        for loop in loops:
            share = loop.fmas / loop.instructions
            mma = f", {loop.mmas} MMA" if loop.mmas else ""
            busiest = ", ".join(f"{op} {n}" for op, n in loop.opcodes.most_common(6))
            print(f"    loop {loop.start:#06x}-{loop.end:#06x}: {loop.instructions} instructions,"
                  f" {loop.fmas} FMA ({share:.0%}){mma}; {busiest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
