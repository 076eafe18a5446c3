#!/usr/bin/env python3
"""The engine's layers, held to their declared order.

A top-level module (`engine/src/<name>.rs` or `engine/src/<name>/`) depends on another
when any of its files names `crate::<other>`, in code or in a comment (a doc link to a
module above is as much a layering mistake as an import). `tools/layers.txt` lists the
modules in layers, bottom to top, one layer per line; the check fails when

- a module names a module on its own line or on a line below it, or
- a module of engine/src is on no line, or on two, or a listed module is gone.

Two modules that depend on each other, directly or in a loop (an import cycle), are
always reported, with the path around the loop.

Usage: tools/layers.py [--src engine/src] [--layers tools/layers.txt]
       tools/layers.py --self-test
"""

import argparse
import os
import re
import sys
import tempfile

CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `use crate::{a::X, b}`: the first name of each item in the braces.
CRATE_GROUP = re.compile(r"\bcrate::\{([^}]*)\}")
GROUP_HEAD = re.compile(r"(?:^|,)\s*([a-z_][a-z0-9_]*)")


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
                code = f.read()
            named = CRATE_PATH.findall(code)
            for group in CRATE_GROUP.findall(code):
                named += GROUP_HEAD.findall(group)
            for other in named:
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


def read_layers(path):
    """[(line number, [module, ...])], bottom layer first."""
    layers = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            names = line.split("#", 1)[0].split()
            if names:
                layers.append((number, names))
    return layers


def check(src, layers_path):
    """Problems found (empty when the code keeps to its layers)."""
    edges = graph(src)
    layers = read_layers(layers_path)
    level = {}
    problems = []
    for number, names in layers:
        for name in names:
            if name in level:
                problems.append(f"{layers_path}:{number}: {name} is on two lines")
            level[name] = number
    for name in sorted(set(level) - set(edges)):
        problems.append(f"{layers_path}: {name} is listed but engine/src has no such module")
    for name in sorted(set(edges) - set(level)):
        problems.append(f"{layers_path}: module {name} is on no line; add it to its layer")
    for cycle in cycles(edges):
        problems.append(
            "import cycle between modules: "
            + " <-> ".join(sorted(cycle))
            + describe(cycle, edges)
        )
    for name in sorted(edges):
        if name not in level:
            continue
        for other in sorted(edges[name]):
            if other in level and level[other] >= level[name]:
                where = "its own line" if level[other] == level[name] else "a line above it"
                problems.append(
                    f"{name} names crate::{other}, which is on {where} "
                    f"({layers_path}:{level[other]})"
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
        write("a.rs", "pub fn g() {}\n")
        write("b/mod.rs", "pub struct X;\n")
        write("b/inner.rs", "fn f() { crate::a::g() }\n")
        write("c.rs", "use crate::{a, b::X};\n/// See [`crate::b::X`].\n")
        layers = os.path.join(d, "layers")
        with open(layers, "w", encoding="utf-8") as f:
            f.write("# bottom\na\nb\n# top\nc\n")
        assert check(src, layers) == [], check(src, layers)
        # An upward import, and a cycle.
        write("a.rs", "use crate::b::X;\n")
        problems = check(src, layers)
        assert any("a <-> b" in p for p in problems), problems
        assert any("a names crate::b, which is on a line above it" in p for p in problems), problems
        # An upward name in a comment only.
        write("a.rs", "// built by crate::c\n")
        problems = check(src, layers)
        assert f"a names crate::c, which is on a line above it ({layers}:5)" in problems, problems
        # A grouped import.
        write("a.rs", "use crate::{b::X};\n")
        problems = check(src, layers)
        assert any("a names crate::b" in p for p in problems), problems
        # A module on no line, and a listed module that is gone.
        write("a.rs", "\n")
        write("d.rs", "\n")
        os.remove(os.path.join(src, "c.rs"))
        problems = check(src, layers)
        assert any("module d is on no line" in p for p in problems), problems
        assert any("c is listed but" in p for p in problems), problems
    print("layers.py self-test passed")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=os.path.join(root, "engine", "src"))
    parser.add_argument("--layers", default=os.path.join(here, "layers.txt"))
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test:
        self_test()
        return 0
    problems = check(args.src, args.layers)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    edges = graph(args.src)
    print(
        f"{len(edges)} modules, {sum(len(e) for e in edges.values())} imports, "
        f"all downward through {os.path.relpath(args.layers, root)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
