#!/usr/bin/env python3
"""The layering checks of docs/architecture.md, over the source as text (rustfmt'd code).

    python3 .ci/layering.py            # from the repository root

1. The dependency graph between the top-level modules of src/ (a folder or a file each),
   from the `crate::NAME` paths in code (comments and doc links dropped), and its cycles.
2. Functions longer than 100 lines in src/ and snapshotter/src/ (house style: a function fits
   a screen, or its comment says why; none over 150).
Exits 1 when there is a cycle or a function over 150 lines.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def rust_files(path):
    if os.path.isfile(path):
        return [path]
    out = []
    for dp, _, fs in os.walk(path):
        out += [os.path.join(dp, f) for f in fs if f.endswith(".rs")]
    return out


def graph(src):
    mods = sorted({f[:-3] if f.endswith(".rs") else f for f in os.listdir(src) if f not in ("main.rs", "lib.rs")})
    edges = {}
    for m in mods:
        paths = rust_files(os.path.join(src, m + ".rs")) if os.path.exists(os.path.join(src, m + ".rs")) else []
        if os.path.isdir(os.path.join(src, m)):
            paths += rust_files(os.path.join(src, m))
        deps = set()
        for p in paths:
            code = "\n".join(re.sub(r"//.*$", "", l) for l in open(p, encoding="utf-8").read().split("\n"))
            names = re.findall(r"crate::(\w+)", code)
            for group in re.findall(r"use crate::\{([^;]*)\};", code, re.S):
                names += re.findall(r"(?:^|[,{\s])(\w+)", group)
            deps |= {n for n in names if n in mods and n != m}
        edges[m] = deps
    return mods, edges


def cycles(mods, edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    return out


FN = re.compile(r'^(\s*)(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')


def long_functions(roots, limit):
    out = []
    for root in roots:
        for p in rust_files(root):
            lines = open(p, encoding="utf-8").read().split("\n")
            for i, line in enumerate(lines):
                m = FN.match(line)
                if not m:
                    continue
                j = i
                while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
                    j += 1
                if j >= len(lines) or "{" not in lines[j] or lines[j].rstrip().endswith("}"):
                    continue  # a declaration, or a one-line body
                k = j + 1
                while k < len(lines) and lines[k] != m.group(1) + "}":
                    k += 1
                if k - i + 1 > limit:
                    out.append((k - i + 1, m.group(8), f"{os.path.relpath(p, ROOT)}:{i + 1}"))
    return sorted(out, reverse=True)


def main():
    mods, edges = graph(os.path.join(ROOT, "src"))
    for m in mods:
        print(f"{m:10s} -> {' '.join(sorted(edges[m])) or '-'}")
    cyc = cycles(mods, edges)
    print("cycles:", cyc if cyc else "none")
    longest = long_functions([os.path.join(ROOT, "src"), os.path.join(ROOT, "snapshotter", "src")], 100)
    print("functions over 100 lines:" if longest else "functions over 100 lines: none")
    for n, name, where in longest:
        print(f"{n:5d} {name:24s} {where}")
    return 1 if cyc or any(n > 150 for n, _, _ in longest) else 0


if __name__ == "__main__":
    sys.exit(main())
