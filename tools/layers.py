#!/usr/bin/env python3
"""Import cycles between the engine's top-level modules, held to a baseline.

A top-level module (`engine/src/<name>.rs` or `engine/src/<name>/`) depends on another
when any of its files names `crate::<other>` outside a comment. Modules that depend on
each other, directly or in a loop, form a cycle (a strongly connected component of
that graph). The cycles allowed today are listed in `tools/layers.allowed`, one per
line; the check fails when

- a cycle is not within an allowed one (a new import closed a loop), or
- an allowed cycle is larger than what the code has now (a loop was broken: shrink
  the baseline so it cannot come back unnoticed).

Usage: tools/layers.py [--src engine/src] [--allowed tools/layers.allowed]
       tools/layers.py --self-test
"""

import argparse
import os
import re
import sys
import tempfile

CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def strip_comments(text):
    """The code of a Rust file without its // comments (doc comments included)."""
    out = []
    for line in text.splitlines():
        # A `//` inside a string literal is rare in this code base and only hides
        # an import that the next line of the same `use` would show anyway.
        at = line.find("//")
        out.append(line if at < 0 else line[:at])
    return "\n".join(out)


def modules(src):
    """Top-level module name -> the .rs files it consists of."""
    found = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            found.setdefault(entry[:-3], []).append(path)
        elif os.path.isdir(path):
            for root, _, files in os.walk(path):
                found.setdefault(entry, []).extend(
                    os.path.join(root, f) for f in sorted(files) if f.endswith(".rs")
                )
    return found


def graph(src):
    mods = modules(src)
    edges = {m: set() for m in mods}
    for name, files in mods.items():
        for path in files:
            with open(path, encoding="utf-8") as f:
                code = strip_comments(f.read())
            for other in CRATE_PATH.findall(code):
                if other != name and other in mods:
                    edges[name].add(other)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def read_allowed(path):
    allowed = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].split()
            if line:
                allowed.append((number, frozenset(line)))
    return allowed


def check(src, allowed_path):
    """Problems found (empty when the code keeps to the baseline)."""
    edges = graph(src)
    found = cycles(edges)
    allowed = read_allowed(allowed_path)
    problems = []
    for cycle in found:
        if not any(cycle <= a for _, a in allowed):
            problems.append(
                "new import cycle between modules: "
                + " <-> ".join(sorted(cycle))
                + describe(cycle, edges)
            )
    for number, a in allowed:
        within = [c for c in found if c <= a]
        now = frozenset().union(*within) if within else frozenset()
        if now != a and not any(c & a and not c <= a for c in found):
            gone = sorted(a - now)
            problems.append(
                f"{allowed_path}:{number}: cycle broken for {' '.join(gone)}; "
                "write the cycles that remain instead: "
                + ("; ".join(" ".join(sorted(c)) for c in within) or "none")
            )
    return problems


def describe(cycle, edges):
    lines = [
        f"\n  {m} -> {', '.join(sorted(edges[m] & cycle))}" for m in sorted(cycle)
    ]
    return "".join(lines)


def self_test():
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src")
        os.makedirs(os.path.join(src, "b"))

        def write(rel, text):
            with open(os.path.join(src, rel), "w", encoding="utf-8") as f:
                f.write(text)

        write("lib.rs", "pub mod a; pub mod b; pub mod c;\n")
        write("a.rs", "use crate::b::X;\n// crate::c in a comment\n")
        write("b/mod.rs", "pub struct X;\n")
        write("b/inner.rs", "fn f() { crate::a::g() }\n")
        write("c.rs", "use crate::a;\n")
        allowed = os.path.join(d, "allowed")
        with open(allowed, "w", encoding="utf-8") as f:
            f.write("# allowed\na b\n")
        assert check(src, allowed) == [], check(src, allowed)
        write("a.rs", "use crate::b::X;\nuse crate::c::Y;\n")
        problems = check(src, allowed)
        assert len(problems) == 1 and "a <-> b <-> c" in problems[0], problems
        write("a.rs", "\n")
        problems = check(src, allowed)
        assert len(problems) == 1 and "cycle broken for a b" in problems[0], problems
    print("layers.py self-test passed")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=os.path.join(root, "engine", "src"))
    parser.add_argument("--allowed", default=os.path.join(here, "layers.allowed"))
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test:
        self_test()
        return 0
    problems = check(args.src, args.allowed)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    found = cycles(graph(args.src))
    print(f"module cycles: {len(found)}, none beyond {os.path.relpath(args.allowed, root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
