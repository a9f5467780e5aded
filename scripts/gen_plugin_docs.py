"""Generate the reference blocks of docs/plugins.md from the code, so the plugin guide cannot drift from it.

    python scripts/gen_plugin_docs.py          # rewrite the generated blocks
    python scripts/gen_plugin_docs.py --check  # exit 1 if a block is stale (a test runs this)

Blocks are delimited by ``<!-- BEGIN GENERATED: NAME -->`` / ``<!-- END GENERATED: NAME -->``:
``param-kinds`` (the table of :data:`cfx_cli.params.KINDS` and the fields of ``Param``) and ``protocols`` (the
classes a plugin subclasses or receives, as Python stubs read from their source: fields with their types,
defaults and comments, methods with their signatures and docstrings). Reads source text only; imports nothing
heavy.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfx_cli.params import KINDS  # noqa: E402

DOC = ROOT / "docs" / "plugins.md"

#: (module file, class, members shown; None = every field and public method defined in the class)
PROTOCOLS: list[tuple[str, str, list[str] | None]] = [
    ("cfx_cli/explainers.py", "Explainer", None),
    ("cfx_cli/explainers.py", "ExplainContext", None),
    ("cfx_cli/explainers.py", "RunOptions", None),
    ("cfx_cli/explainers.py", "ExplainBatch", None),
    ("cfx_cli/explainers.py", "ExplainOutput", None),
    ("cfx_cli/classifiers.py", "Classifier", ["labels", "input_size", "capabilities", "spec", "calls",
                                              "predict_proba", "logits", "scores", "close"]),
    ("cfx_cli/classifiers.py", "ClassifierAdapter", None),
    ("cfx_cli/classifiers.py", "ClassifierOptions", None),
    ("cfx_cli/metrics.py", "Metric", None),
    ("cfx_cli/metrics.py", "MetricContext", ["device", "options", "classifier"]),
    ("cfx_cli/runs.py", "RunData", ["path", "info", "records", "explained", "image"]),
    ("cfx_cli/regions.py", "RegionSource", None),
]


def _comments(source: str) -> dict[int, str]:
    """line number → the comment on that line (without ``#``/``#:``)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = re.sub(r"^#:?\s?", "", tok.string)
    return out


def _doc_lines(node: ast.AST, indent: str) -> list[str]:
    doc = ast.get_docstring(node)
    if not doc:
        return []
    lines = doc.splitlines()
    if len(lines) == 1:
        return [f'{indent}"""{lines[0]}"""']
    return [f'{indent}"""{lines[0]}'] + [f"{indent}{x}".rstrip() for x in lines[1:]] + [f'{indent}"""']


def _field(stmt: ast.AnnAssign | ast.Assign, source: str, comments: dict[int, str], indent: str) -> list[str]:
    seg = ast.get_source_segment(source, stmt)
    text = " ".join(line.strip() for line in seg.splitlines())
    lead = []
    line = stmt.lineno - 1
    while comments.get(line) is not None and source.splitlines()[line - 1].strip().startswith("#"):
        lead.insert(0, f"{indent}# {comments[line]}")
        line -= 1
    trailing = comments.get(stmt.end_lineno)
    return lead + [f"{indent}{text}" + (f"  # {trailing}" if trailing else "")]


def _method(fn: ast.FunctionDef, source: str, indent: str) -> list[str]:
    """The ``def`` header as written (all its lines), then the docstring or ``...``."""
    lines = source.splitlines()
    first_body = fn.body[0].lineno - 1
    header = lines[fn.lineno - 1: first_body]
    strip = len(header[0]) - len(header[0].lstrip())
    deco = [f"{indent}@{ast.unparse(d)}" for d in fn.decorator_list]
    return deco + [indent + h[strip:] for h in header] + (_doc_lines(fn, indent + "    ") or [f"{indent}    ..."])


def _name(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    if isinstance(stmt, ast.FunctionDef):
        return stmt.name
    return None


def class_stub(module_file: str, class_name: str, members: list[str] | None) -> str:
    source = (ROOT / module_file).read_text(encoding="utf-8")
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    comments = _comments(source)
    module = module_file.removesuffix(".py").replace("/", ".")
    bases = ", ".join(ast.unparse(b) for b in cls.bases)
    decorators = [f"@{ast.unparse(d)}" for d in cls.decorator_list]
    out = decorators + [f"class {class_name}{f'({bases})' if bases else ''}:  # {module}"]
    out += _doc_lines(cls, "    ")
    if ast.get_docstring(cls):
        out.append("")
    by_name = {_name(s): s for s in cls.body if _name(s)}
    if members is None:
        members = [n for n in by_name if not n.startswith("_") or n == "__init__"]
    for name in members:
        stmt = by_name[name]
        if isinstance(stmt, ast.FunctionDef):
            out += ([""] if out[-1] else []) + _method(stmt, source, "    ")
        else:
            out += _field(stmt, source, comments, "    ")
    return "\n".join(out)


def protocols_block() -> str:
    stubs = [class_stub(*entry) for entry in PROTOCOLS]
    return "```python\n" + "\n\n\n".join(stubs) + "\n```"


def param_kinds_block() -> str:
    rows = ["| kind | value in `self.params` | what `--set KEY=VALUE` accepts |", "|---|---|---|"]
    rows += [f"| `{kind}` | `{python}` | {accepts} |" for kind, (python, accepts) in KINDS.items()]
    return "\n".join(rows) + "\n\n" + "```python\n" + class_stub("cfx_cli/params.py", "Param",
                                                                   ["name", "kind", "default", "help", "choices",
                                                                    "min", "max"]) + "\n```"


BLOCKS = {"param-kinds": param_kinds_block, "protocols": protocols_block}


def render(text: str) -> str:
    for name, build in BLOCKS.items():
        begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{DOC}: no {begin} … {end} block")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        note = "<!-- generated by scripts/gen_plugin_docs.py from the code; do not edit -->"
        text = f"{head}{begin}\n{note}\n{build()}\n{end}{tail}"
    return text


def main() -> int:
    current = DOC.read_text(encoding="utf-8")
    fresh = render(current)
    if "--check" in sys.argv:
        if fresh != current:
            print(f"{DOC} is stale: run python scripts/gen_plugin_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
