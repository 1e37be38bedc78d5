#!/usr/bin/env python3
"""Locked (atomic read-modify-write) instructions per request, from a callgrind profile made with
--dump-instr=yes (bench/callgrind.sh LOCKS=1 runs this). At many connections a locked
instruction waits for the stores before it to drain and often lands on a line gone cold, so
their count is a cost that instruction totals hide; nginx, single-threaded, makes almost none.

    bench/locked.py PROFILE REQUESTS [TOP]

Prints the total per request, then the TOP functions (default 25) and source lines by locked
instructions per request. Each object in the profile is disassembled with objdump to find its `lock`-prefixed
instructions and its `xchg`s with memory (implicitly locked).
"""
import re
import subprocess
import sys
from collections import defaultdict


def parse(path):
    """Self cost (first event) per (object, function, instruction address), and the source
    line (file, line) of each instruction address."""
    names = {"ob": {}, "fn": {}, "fl": {}}
    cost = defaultdict(int)
    lines = {}
    ob = fn = fl = None
    last = last_line = 0
    skip_next = False
    comp = re.compile(r"^(c?)(ob|fn|fl|fi|fe)=(?:\((\d+)\))?\s*(.*)$")
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c0 = line[0]
            if c0.isdigit() or c0 in "+-*" or line.startswith("0x"):
                pos = line.split()[0]
                if pos == "*":
                    addr = last
                elif pos[0] in "+-":
                    addr = last + int(pos, 0)
                else:
                    addr = int(pos, 0)
                last = addr
                parts = line.split()
                if len(parts) >= 2:
                    lp = parts[1]
                    if lp == "*":
                        pass
                    elif lp[0] in "+-":
                        last_line += int(lp)
                    else:
                        last_line = int(lp)
                if skip_next:  # the inclusive cost of a call: not this instruction's own
                    skip_next = False
                    continue
                if len(parts) >= 3:
                    cost[(ob, fn, addr)] += int(parts[2])
                    lines[(ob, addr)] = (fl, last_line)
                continue
            if line.startswith("calls="):
                skip_next = True
                continue
            m = comp.match(line)
            if m:
                callee, kind, ident, name = m.groups()
                table = names["fl" if kind in ("fi", "fe") else kind]
                if ident is not None:
                    if name:
                        table[ident] = name
                    name = table.get(ident, name)
                if not callee:
                    if kind == "ob":
                        ob = name
                    elif kind == "fn":
                        fn = name
                    else:
                        fl = name
    return cost, lines


def locked_addresses(obj):
    """Addresses of the locked instructions in an object file, by objdump."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True
    ).stdout
    addrs = set()
    for line in out.splitlines():
        if "lock " not in line and "xchg" not in line:
            continue
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)$", line)
        if not m:
            continue
        insn = m.group(2)
        if insn.startswith("lock ") or (insn.startswith("xchg") and "(" in insn):
            addrs.add(int(m.group(1), 16))
    return addrs


LIBRARY = ("/rustc/", "/library/core/", "/library/alloc/", "/library/std/")


def call_sites(per_addr):
    """Locked instructions per call site: the innermost frame of each address's inline chain
    outside the standard library (an atomic in `Arc::clone` is charged to the line that
    cloned), by addr2line."""
    sites = defaultdict(int)
    by_ob = defaultdict(list)
    for (ob, addr), n in per_addr.items():
        by_ob[ob].append((addr, n))
    for ob, items in by_ob.items():
        out = subprocess.run(
            ["addr2line", "-e", ob, "-a", "-i", "-f", "-C"] + [hex(a) for a, _ in items],
            capture_output=True, text=True,
        ).stdout.splitlines()
        # -a: each address's chain starts with the address; then (function, file:line) pairs,
        # innermost first.
        chains = {}
        i = 0
        while i < len(out):
            addr = int(out[i], 16)
            i += 1
            frames = []
            while i + 1 < len(out) and not out[i].startswith("0x"):
                frames.append((out[i], out[i + 1]))
                i += 2
            chains[addr] = frames
        short = ob.rsplit("/", 1)[-1]
        for addr, n in items:
            frames = chains.get(addr, [])
            site = next((f for f in frames if not any(l in f[1] for l in LIBRARY)), None)
            if site is None:
                site = frames[-1] if frames else ("?", "?")
            fn, loc = site
            loc = loc.split(" (discriminator")[0]
            loc = loc.split("/src/", 1)[-1] if "/src/" in loc else loc
            sites[f"{short} {loc}  ({fn[:70]})"] += n
    return sites


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    cost, lines = parse(path)
    objects = {ob for ob, _, _ in cost if ob}
    locked = {ob: locked_addresses(ob) for ob in objects}
    per_fn = defaultdict(int)
    per_addr = defaultdict(int)
    total = 0
    for (ob, fn, addr), n in cost.items():
        if ob and addr in locked[ob]:
            per_fn[(ob.rsplit("/", 1)[-1], fn)] += n
            per_addr[(ob, addr)] += n
            total += n
    print(f"locked instructions: {total / requests:.1f} per request")
    print("by function:")
    for (ob, fn), n in sorted(per_fn.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{n / requests:7.2f}  {ob}  {fn[:110]}")
    print("by call site (addr2line's inline chain, library frames skipped):")
    for where, n in sorted(call_sites(per_addr).items(), key=lambda kv: -kv[1])[:top]:
        print(f"{n / requests:7.2f}  {where}")


if __name__ == "__main__":
    main()
