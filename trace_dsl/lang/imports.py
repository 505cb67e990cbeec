"""Read a policy file and every file it imports, depth first, with the import rules enforced.

An import path is relative to the importing file and must stay inside the policy's folder
tree (the folder of the file given to `load_modules`), after symbolic links are resolved. A file
cannot import itself directly or through others. Problems become diagnostics on the import
statement; nothing here raises for bad input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trace_dsl.lang import nodes as n
from trace_dsl.lang.diagnostics import Diagnostic
from trace_dsl.lang.parser import ParseFailure, parse_source


@dataclass
class Module:
    """One loaded file.

    Attributes:
        display: the path shown in diagnostics (the importing path joined with the import).
        resolved: the absolute, symlink-free path.
        source: the file's text.
        tree: the parsed file, or `None` when it does not parse.
        imports: the modules it imports, in source order (those that loaded).
    """

    display: str
    resolved: Path
    source: str
    tree: n.PolicyFile | None
    imports: list["Module"] = field(default_factory=list)


@dataclass
class ModuleSet:
    """The main file and everything it imports.

    Attributes:
        main: the file given by the user (`None` when it cannot be read).
        order: every loaded module, imports before their importer, each once.
        diagnostics: read, syntax and import problems, in the order found.
    """

    main: Module | None
    order: list[Module]
    diagnostics: list[Diagnostic]

    def sources(self) -> dict[str, str]:
        """Map each module's display path to its text, for rendering diagnostics."""
        return {module.display: module.source for module in self.order}


def _read(path: Path, display: str, diagnostics: list[Diagnostic], at: tuple[str, n.Span] | None) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if at is None:
            diagnostics.append(Diagnostic("TP003", f"policy file {display} not found", display,
                                          hint="check the path; policy files end in .tp"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        where, span = at if at else (display, None)
        diagnostics.append(
            Diagnostic(
                "TP003",
                f"cannot read {display}: {exc}",
                where,
                span.line if span else 0,
                span.column if span else 0,
                hint="policy files are UTF-8 text",
            )
        )
        return None


def load_modules(path: str | os.PathLike[str], *, source: str | None = None) -> ModuleSet:
    """Load `path` and its imports.

    Args:
        path: the policy (or shared library) file.
        source: its text, when already in memory (it is then not read from disk; imports are).
    """
    display = str(path)
    resolved = Path(path).resolve()
    root = resolved.parent
    diagnostics: list[Diagnostic] = []
    loaded: dict[Path, Module] = {}
    order: list[Module] = []

    def load(file: Path, shown: str, text: str | None, stack: list[Path], at: tuple[str, n.Span] | None) -> Module | None:
        if text is None:
            text = _read(file, shown, diagnostics, at)
            if text is None:
                return None
        try:
            tree = parse_source(text, shown)
        except ParseFailure as failure:
            diagnostics.extend(failure.diagnostics)
            tree = None
        module = Module(shown, file, text, tree)
        loaded[file] = module
        if tree is not None:
            for statement in tree.statements:
                if isinstance(statement, n.Import):
                    child = resolve_import(module, statement, stack + [file])
                    if child is not None:
                        module.imports.append(child)
        order.append(module)
        return module

    def resolve_import(importer: Module, statement: n.Import, stack: list[Path]) -> Module | None:
        relative = statement.path.value
        span = statement.path.span
        where = importer.display
        if not relative or os.path.isabs(relative) or relative.startswith("~"):
            diagnostics.append(
                Diagnostic("TP111", f"import path `{relative}` must be relative to this file", where, span.line,
                           span.column, span.end_column, hint="write a path such as \"shared/refusals.tp\"")
            )
            return None
        target = (importer.resolved.parent / relative).resolve()
        shown = os.path.normpath(os.path.join(os.path.dirname(importer.display), relative))
        if not target.is_relative_to(root):
            diagnostics.append(
                Diagnostic("TP111", f"import `{relative}` leaves the policy's folder {root}", where, span.line,
                           span.column, span.end_column,
                           hint="move the shared file into the policy's folder or a folder below it")
            )
            return None
        if target in stack:
            names = [_display_of(p, loaded, shown) for p in stack[stack.index(target):]] + [shown]
            diagnostics.append(
                Diagnostic("TP112", "import cycle: " + " -> ".join(names), where, span.line, span.column,
                           span.end_column, hint="move the shared definitions into a file that both can import")
            )
            return None
        if target in loaded:
            return loaded[target]
        if not target.is_file():
            diagnostics.append(
                Diagnostic("TP110", f"imported file `{relative}` not found (looked for {shown})", where, span.line,
                           span.column, span.end_column, hint="paths are relative to the importing file")
            )
            return None
        return load(target, shown, None, stack, (where, span))

    main = load(resolved, display, source, [], None)
    return ModuleSet(main, order, diagnostics)


def _display_of(path: Path, loaded: dict[Path, Module], fallback: str) -> str:
    module = loaded.get(path)
    return module.display if module is not None else fallback
