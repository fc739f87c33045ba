#!/usr/bin/env python3
"""Fails when two source files of one crate refer to each other.

Each crate's `src/` is read; a file "refers to" another when it names a path
into it (`crate::a::b`, `super::x`, `self::y` in a `use` or an expression).
Test-only code (`#[cfg(test)] mod ... { }` blocks and files under a `tests`
module) is left out: tests may reach into what they test. Mutual references
make a change in one file a change in both; the shim's and the agent's
shape (DESIGN.md, CONVENTIONS.md) keeps dependencies one way.

usage: ci/check-module-cycles.py [CRATE_DIR ...]   (default: every crate)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)::\{", re.S)


def module_of(src: Path, f: Path) -> list[str]:
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def strip_tests(text: str) -> str:
    """Removes `#[cfg(test)]` items (a mod block or a single item)."""
    out, i = [], 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k = j + len("#[cfg(test)]")
        semi, brace = text.find(";", k), text.find("{", k)
        if brace < 0 or (0 <= semi < brace):
            i = semi + 1  # `mod tests;` or a one-line item
            continue
        depth, p = 0, brace
        while p < len(text):
            if text[p] == "{":
                depth += 1
            elif text[p] == "}":
                depth -= 1
                if depth == 0:
                    break
            p += 1
        i = p + 1


def comments_out(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def expand_groups(text: str) -> list[tuple[str, str]]:
    """`use crate::{a::x, b}` gives (crate, ::a::x), (crate, ::b)."""
    found = []
    for m in USE_GROUP_RE.finditer(text):
        depth, p, start = 1, m.end(), m.end()
        while p < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[p], 0)
            p += 1
        body = text[start : p - 1]
        for item in re.split(r",(?![^{]*\})", body):
            item = item.strip()
            head = re.match(r"[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*", item)
            if head:
                found.append((m.group(1), "::" + head.group(0)))
    return found


def check(crate: Path) -> list[str]:
    src = crate / "src"
    if not src.is_dir():
        return []
    files = {tuple(module_of(src, f)): f for f in src.rglob("*.rs") if "bin" not in f.relative_to(src).parts}
    refers: dict[tuple, set] = {m: set() for m in files}
    for mod, f in files.items():
        if "tests" in mod or mod[-1:] == ("fake",):
            continue
        text = comments_out(strip_tests(f.read_text()))
        is_dir_mod = f.name == "mod.rs" or f.name == "lib.rs"
        for root, path in PATH_RE.findall(text) + expand_groups(text):
            parts = [p for p in path.split("::") if p]
            if root == "crate":
                base = []
            elif root == "self":
                base = list(mod) if is_dir_mod else list(mod[:-1])
            else:  # super
                base = list(mod[:-1]) if is_dir_mod else list(mod[:-2])
                while parts and parts[0] == "super":
                    parts, base = parts[1:], base[:-1]
            full = base + parts
            target = None
            for n in range(len(full), -1, -1):
                if tuple(full[:n]) in files:
                    target = tuple(full[:n])
                    break
            if target is not None and target != mod and target != ():
                refers[mod].add(target)
        if is_dir_mod:
            # `child::item` from a parent module names the child's file.
            for child in re.findall(r"(?<![:\w])([a-z_][a-z0-9_]*)::", text):
                target = tuple(mod) + (child,)
                if target in files:
                    refers[mod].add(target)
    cycles = []
    for a, targets in refers.items():
        for b in targets:
            if a < b and a in refers.get(b, set()):
                cycles.append(f"{crate.name}: {files[a]} <-> {files[b]}")
    return cycles


def main() -> int:
    crates = [Path(a).resolve() for a in sys.argv[1:]] or sorted(
        m.parent
        for m in ROOT.rglob("Cargo.toml")
        if "target" not in m.parts and "fuzz" not in m.parts and (m.parent / "src").is_dir()
    )
    cycles = [c for crate in crates for c in check(crate)]
    for c in cycles:
        print(f"files refer to each other: {c}", file=sys.stderr)
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
