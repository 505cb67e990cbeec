"""Parse policy source text into the syntax tree of `trace_dsl.lang.nodes`.

The grammar lives in `trace_dsl/grammar/policy.lark` (LALR with Lark's basic lexer). One
transformer, `_ToNodes`, maps each grammar rule onto its node record. Syntax errors are turned
into `Diagnostic`s in domain words: `_ERROR_EXAMPLES` lists small broken snippets whose parser
states Lark's `match_examples` recognises, and anything else is described by the tokens the
parser expected. After a syntax error the parser resumes at the next line that starts a
statement, so one run reports every broken statement.
"""

from __future__ import annotations

import bisect
import copy
import functools
import re
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.parsers.lalr_parser_state import ParserState
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from trace_dsl.lang import nodes as n
from trace_dsl.lang.diagnostics import Diagnostic

# Statement keywords: a line starting with one of these is where parsing resumes after an error.
_STATEMENT_START = re.compile(r"^[ \t]*(policy|import|let|predicate|rule|example)\b", re.MULTILINE)

_VALUE_TOKENS = {"NAME", "STRING", "REGEX", "SIGNED_NUMBER", "NOT", "LEN", "WORDS"}


@functools.lru_cache(maxsize=1)
def grammar_parser() -> Lark:
    """Return the LALR parser for `.tp` files, built once per process."""
    grammar = resources.files("trace_dsl.grammar").joinpath("policy.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        # The basic lexer keeps keywords reserved everywhere: with the contextual lexer, a
        # statement keyword after a dangling `and` would read as a name and hide the real error.
        lexer="basic",
        propagate_positions=True,
        maybe_placeholders=True,
    )


class ParseFailure(Exception):
    """Raised by `parse_source` when the text has syntax errors; `diagnostics` lists them all."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__(diagnostics[0].headline() if diagnostics else "syntax error")
        self.diagnostics = diagnostics


class _StringLiteralError(Exception):
    def __init__(self, token: Token, message: str) -> None:
        super().__init__(message)
        self.token = token
        self.message = message


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": "\n", "t": "\t", "r": "\r"}


def decode_string(token: Token) -> str:
    """Decode a STRING token: the text between the quotes with \\" \\\\ \\n \\t \\r \\uXXXX escapes."""
    raw = str(token)[1:-1]
    out: list[str] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        escape = raw[i + 1] if i + 1 < len(raw) else ""
        if escape in _ESCAPES:
            out.append(_ESCAPES[escape])
            i += 2
        elif escape == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", raw[i + 2 : i + 6]):
            code = int(raw[i + 2 : i + 6], 16)
            low = raw[i + 8 : i + 12] if raw[i + 6 : i + 8] == "\\u" else ""
            if 0xD800 <= code <= 0xDBFF and re.fullmatch(r"[dD][c-fC-F][0-9a-fA-F]{2}", low):
                # A surrogate pair, as JSON writes a character beyond U+FFFF.
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)))
                i += 12
                continue
            if 0xD800 <= code <= 0xDFFF:
                # UTF-8 cannot encode a lone surrogate, so the policy could not be hashed or written.
                raise _StringLiteralError(token, f"`\\u{raw[i + 2 : i + 6]}` is half of a surrogate pair")
            out.append(chr(code))
            i += 6
        else:
            raise _StringLiteralError(token, f"invalid escape `\\{escape}` in a string")
    return "".join(out)


def _span(meta_or_token) -> n.Span:
    return n.Span(meta_or_token.line, meta_or_token.column, meta_or_token.end_line, meta_or_token.end_column)


def _kept(children: list) -> list:
    """Children without the keyword and punctuation tokens that `!` rules keep for positions."""
    return [
        c
        for c in children
        if c is not None and not (isinstance(c, Token) and c.type not in _VALUE_TOKENS)
    ]


@v_args(meta=True)
class _ToNodes(Transformer):
    """Map each grammar rule onto its node record (one method per rule or alias)."""

    # ---- literals
    def string(self, meta, children):
        (token,) = children
        return n.Str(_span(token), decode_string(token))

    def number(self, meta, children):
        (token,) = children
        return n.Num(_span(token), float(token), str(token))

    def boolean(self, meta, children):
        (token,) = children
        return n.Bool(_span(token), str(token) == "true")

    def list(self, meta, children):
        return n.ListLit(_span(meta), tuple(_kept(children)))

    def map(self, meta, children):
        return n.MapLit(_span(meta), tuple(_kept(children)))

    def map_entry(self, meta, children):
        key, value = children
        name = decode_string(key) if key.type == "STRING" else str(key)
        return n.MapEntry(_span(meta), name, value)

    # ---- values
    def ref(self, meta, children):
        (token,) = children
        return n.Ref(_span(token), str(token))

    def ref_value(self, meta, children):
        return self.ref(meta, children)

    def response_field(self, meta, children):
        (token,) = children
        return n.Field(_span(meta), "response", str(token))

    def pair_field(self, meta, children):
        (token,) = children
        return n.Field(_span(meta), "pair", str(token))

    def text(self, meta, children):
        (token,) = children
        return n.Text(_span(token), str(token))

    def length(self, meta, children):
        unit, subject = children
        return n.Length(_span(meta), "characters" if unit == "len" else "words", subject)

    def model_kind(self, meta, children):
        return children[0]

    def model_call(self, meta, children):
        kind_token, args = children
        subject = target = None
        options = []
        for arg in args or ():
            if isinstance(arg, n.Text):
                subject = subject or arg
            elif isinstance(arg, n.Str):
                target = target or arg
            else:
                options.append(arg)
        return n.ModelCall(_span(meta), str(kind_token), subject, target, tuple(options))

    def call_args(self, meta, children):
        return list(children)

    def subject_arg(self, meta, children):
        return children[0]

    def name_arg(self, meta, children):
        (token,) = children
        return n.Str(_span(token), decode_string(token))

    def option_arg(self, meta, children):
        name, value = children
        return n.OptionArg(_span(meta), str(name), value)

    # ---- tests
    def cmp_op(self, meta, children):
        return str(children[0])

    keyword_op = set_op = cmp_op

    def compare(self, meta, children):
        left, op, right = children
        return n.Compare(_span(meta), left, op, right)

    def matches(self, meta, children):
        subject, token = children
        body, _, flags = str(token)[1:].rpartition("/")
        regex = n.Regex(_span(token), body, flags)
        return n.Matches(_span(meta), subject, regex)

    def keywords(self, meta, children):
        subject, op, words = children
        return n.Keywords(_span(meta), subject, op, words)

    def set_test(self, meta, children):
        left, op, right = children
        return n.SetTest(_span(meta), left, op, right)

    def truth(self, meta, children):
        return n.Truth(_span(meta), children[0])

    def not_expr(self, meta, children):
        return n.Not(_span(meta), children[-1])

    def and_expr(self, meta, children):
        return n.And(_span(meta), tuple(children))

    def or_expr(self, meta, children):
        return n.Or(_span(meta), tuple(children))

    # ---- statements
    def description(self, meta, children):
        return self.string(meta, children)

    def header(self, meta, children):
        kept = _kept(children)
        name, version = (n.Str(_span(t), decode_string(t)) for t in kept[:2])
        description = kept[2] if len(kept) > 2 else None
        return n.Header(_span(meta), name, version, description)

    def import_stmt(self, meta, children):
        (token,) = _kept(children)
        return n.Import(_span(meta), n.Str(_span(token), decode_string(token)))

    def let_stmt(self, meta, children):
        name, value = _kept(children)
        return n.Let(_span(meta), str(name), value)

    def predicate_stmt(self, meta, children):
        name, expr = _kept(children)
        return n.PredicateDef(_span(meta), str(name), expr)

    def unless_clause(self, meta, children):
        return _kept(children)[0]

    def rule_stmt(self, meta, children):
        kept = _kept(children)
        rule_id, title, when = kept[:3]
        unless = kept[3] if len(kept) > 3 else None
        return n.Rule(_span(meta), str(rule_id), n.Str(_span(title), decode_string(title)), when, unless)

    def category(self, meta, children):
        return children[0]

    def expect_rules(self, meta, children):
        return list(children)

    def example_prompt(self, meta, children):
        (token,) = children
        return n.ExampleItem(_span(meta), "prompt", n.Str(_span(token), decode_string(token)))

    def example_history(self, meta, children):
        turns = tuple(n.Str(_span(t), decode_string(t)) for t in children if t is not None)
        return n.ExampleItem(_span(meta), "history", turns)

    def _response(self, meta, children, role):
        token, metadata = children
        response = n.ExampleResponse(_span(meta), role, n.Str(_span(token), decode_string(token)), metadata)
        return n.ExampleItem(_span(meta), role, response)

    def example_chosen(self, meta, children):
        return self._response(meta, children, "chosen")

    def example_rejected(self, meta, children):
        return self._response(meta, children, "rejected")

    def example_pair(self, meta, children):
        return n.ExampleItem(_span(meta), "pair", children[0])

    def example_expect(self, meta, children):
        category, rules = children
        rule_tokens = list(rules or ())
        expectation = n.Expectation(
            _span(meta),
            str(category),
            tuple(str(t) for t in rule_tokens),
            tuple(_span(t) for t in rule_tokens),
        )
        return n.ExampleItem(_span(meta), "expect", expectation)

    def example_stmt(self, meta, children):
        kept = _kept(children)
        title, items = kept[0], kept[1:]
        return n.Example(_span(meta), n.Str(_span(title), decode_string(title)), tuple(items))

    def start(self, meta, children):
        return list(children)


# ---- Syntax errors in domain words ------------------------------------------------------------

# Each label maps to broken snippets that leave the parser in the state the label describes.
_ERROR_EXAMPLES: dict[str, list[str]] = {
    'a rule needs a quoted title after its id, as in `rule R1 "No blanket refusals":`': [
        "rule R1: violates when x",
        "rule R1 violates when x",
    ],
    "a rule's title must be followed by `:`": [
        'rule R1 "t" violates when x',
        'rule R1 "t" when x',
    ],
    'a rule says `violates when <test>` after its title, as in `rule R1 "t": violates when refusal`': [
        'rule R1 "t": when x',
        'rule R1 "t": x',
        'rule R1 "t": violates x',
        'rule R1 "t": violates',
    ],
    "a test is missing here": [
        "predicate p =",
        "predicate p = x and",
        "predicate p = x or",
        "predicate p = not",
        'rule R1 "t": violates when',
        'rule R1 "t": violates when x unless',
        "predicate p = (",
    ],
    "`=` expected after the name, as in `predicate name = <test>` or `let name = [...]`": [
        "predicate p x",
        'let x ["a"]',
        "predicate p",
        "let x",
    ],
    "a value is missing after the operator": [
        "predicate p = x ==",
        "predicate p = x >",
        "predicate p = response contains_any",
        "predicate p = response contains",
        "predicate p = response.harm_categories has_any",
        "predicate p = x in",
    ],
    "`let` takes a literal: a quoted string, a number, true, false or a [list]": [
        "let x =",
        "let x = response",
        "let x = y",
    ],
    "`matches` takes a regular expression between slashes, as in `response matches /(?i)sorry/`": [
        'predicate p = response matches "x"',
        "predicate p = response matches",
        "predicate p = response matches x",
    ],
    "`(` is not closed": [
        "predicate p = (x and y",
        "predicate p = (x",
        "predicate p = embedding(response",
    ],
    "list items must be separated by commas and the list closed with `]`": [
        'let x = ["a" "b"]',
        'let x = ["a"',
        'let x = ["a",',
    ],
    "the header reads `policy \"name\" version \"x.y.z\"`, optionally followed by `description \"...\"`": [
        'policy "x" "1"',
        'policy "x"',
        "policy x",
        'policy "x" version 1',
    ],
    "`expect` takes a category: invert, suppress or retain": [
        'example "e" { expect x }',
        'example "e" { expect }',
    ],
    "`expect ... by` takes rule ids separated by commas": [
        'example "e" { expect invert by }',
        'example "e" { expect invert by R1 R2 }',
    ],
    "an example holds lines starting with prompt, history, chosen, rejected, pair or expect, and ends with `}`": [
        'example "e" { prompt "x"',
        'example "e" { foo "x" }',
        'example "e" { prompt x }',
        'example "e" prompt "x"',
    ],
    "a field name must follow `response.` or `pair.`, and keywords such as `version` or `rule` cannot name a field": [
        "predicate p = response.version",
        "predicate p = pair.rule",
    ],
    "a statement starts with policy, import, let, predicate, rule or example": [
        "x",
        "violates when x",
        '"x"',
    ],
    "two tests must be joined by `and` or `or`": [
        "predicate p = x y",
        "predicate p = x not y",
        'predicate p = response contains "a" "b"',
    ],
}

_TERMINAL_WORDS = {
    "NAME": "a name",
    "STRING": "a quoted string",
    "REGEX": "a /regular expression/",
    "SIGNED_NUMBER": "a number",
    "$END": "the end of the file",
}


def _accepts(error: UnexpectedInput) -> frozenset[str]:
    """The terminals the parser could take where the error happened, after pending reductions.

    A lexer error leaves the parser in a state before LALR reductions, whose token set is wider
    than what the grammar allows there. Each candidate is therefore fed to a copy of the parser
    state to see whether it is really accepted.
    """
    interactive = getattr(error, "interactive_parser", None)
    state = interactive.parser_state if interactive is not None else getattr(error, "state", None)
    if not isinstance(state, ParserState):
        return frozenset(getattr(error, "expected", None) or getattr(error, "allowed", None) or ())
    conf = copy.copy(state.parse_conf)
    conf.callbacks = {}
    accepted = set()
    for terminal in state.parse_conf.parse_table.states[state.position]:
        if not terminal.isupper():
            continue
        trial = ParserState(conf, state.lexer, list(state.state_stack), list(state.value_stack))
        try:
            trial.feed_token(Token(terminal, ""), is_end=terminal == "$END")
        except UnexpectedToken:
            continue
        except Exception:  # noqa: BLE001 - a probe token may break a callback-free reduction; skip it
            continue
        accepted.add(terminal)
    return frozenset(accepted)


@functools.lru_cache(maxsize=1)
def _example_labels() -> dict[tuple[str, frozenset[str]], str]:
    """Map the accepted-token sets of broken snippets to the labels of `_ERROR_EXAMPLES`.

    This is what Lark's `UnexpectedInput.match_examples` does, computed once. The key is the
    last shifted symbol and the tokens accepted after reductions, because one raw LALR state
    can be shared by unrelated contexts (a string inside a list, a string after `contains`).
    """
    labels: dict[tuple[str, frozenset[str]], str] = {}
    for label, snippets in _ERROR_EXAMPLES.items():
        for snippet in snippets:
            try:
                grammar_parser().parse(snippet)
            except UnexpectedInput as error:
                labels.setdefault((_last_shifted(error), _accepts(error)), label)
    return labels


def _last_shifted(error: UnexpectedInput) -> str:
    """Return the token type or rule name on top of the parser's value stack.

    It tells apart states that accept the same tokens: after `policy` and after a rule id, a
    string is expected.
    """
    interactive = getattr(error, "interactive_parser", None)
    state = interactive.parser_state if interactive is not None else getattr(error, "state", None)
    stack = getattr(state, "value_stack", None)
    if not stack:
        return ""
    top = stack[-1]
    return top.type if isinstance(top, Token) else str(getattr(top, "data", type(top).__name__))


def _describe_terminal(parser: Lark, name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return name.lower()
    if pattern.type == "str":
        return f"`{pattern.value}`"
    return name.lower()


_FOUND_WORDS = {"NAME": "name", "STRING": "string", "REGEX": "regular expression", "SIGNED_NUMBER": "number"}


def _describe_found(token: Token) -> str:
    if token.type == "$END":
        return "end of the file"
    if token.type in _FOUND_WORDS:
        return f"{_FOUND_WORDS[token.type]} `{token}`"
    return f"`{token}`"


def _syntax_diagnostic(error: UnexpectedInput, text: str, path: str) -> Diagnostic:
    parser = grammar_parser()
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
        if char == '"':
            return Diagnostic(
                "TP002",
                "string is not closed on this line",
                path,
                error.line,
                error.column,
                hint='close it with `"`; write a quote inside a string as `\\"` and a line break as `\\n`',
            )
        if char == "/":
            return Diagnostic(
                "TP001",
                "regular expression is not closed on this line",
                path,
                error.line,
                error.column,
                hint="close it with `/`; write a slash inside it as `\\/`",
            )
        expected = sorted(_describe_terminal(parser, t) for t in (error.allowed or ()))
        hint = ("expected " + ", ".join(expected)) if expected else None
        return Diagnostic("TP001", f"unexpected character `{char}`", path, error.line, error.column, hint=hint)

    accepted = _accepts(error)
    label = _example_labels().get((_last_shifted(error), accepted))
    if isinstance(error, UnexpectedToken):
        token = error.token
        found = _describe_found(token)
        line, column = (token.line, token.column) if token.type != "$END" else _end_position(text)
        end_column = column + len(str(token)) if token.type != "$END" else 0
    else:  # UnexpectedEOF
        found = "end of the file"
        line, column = _end_position(text)
        end_column = 0
    expected = sorted({_describe_terminal(parser, t) for t in accepted})
    expected_text = "expected " + ", ".join(expected) if expected else None
    if label:
        return Diagnostic("TP001", f"unexpected {found}: {label}", path, line, column, end_column, hint=expected_text)
    return Diagnostic("TP001", f"unexpected {found}", path, line, column, end_column, hint=expected_text)


def _end_position(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


def _error_offset(error: UnexpectedInput, text: str) -> int:
    if isinstance(error, UnexpectedToken) and error.token.type != "$END":
        return error.token.start_pos
    if isinstance(error, UnexpectedCharacters):
        return error.pos_in_stream
    return len(text)


def _masked(text: str, offset: int) -> str:
    """Blank everything before `offset`, keeping line breaks, so positions after it stay exact."""
    return re.sub(r"[^\n]", " ", text[:offset]) + text[offset:]


def _collect_comments(text: str, tokens: list[Token]) -> tuple[n.Comment, ...]:
    lines = text.split("\n")
    comments = []
    for token in tokens:
        before = lines[token.line - 1][: token.column - 1]
        comments.append(n.Comment(_span(token), str(token).rstrip(), own_line=not before.strip()))
    return tuple(comments)


def parse_source(text: str, path: str = "<string>") -> n.PolicyFile:
    """Parse one file's text into a `PolicyFile`.

    Raises:
        ParseFailure: with one diagnostic per broken statement (the parser resumes at the next
            line that starts a statement after each error).
    """
    if text.startswith("\ufeff"):
        # Windows editors save UTF-8 with a byte-order mark; a space in its place keeps every
        # column the same as in the file.
        text = " " + text[1:]
    diagnostics: list[Diagnostic] = []
    offset = 0
    while True:
        comment_tokens: list[Token] = []
        try:
            tree = _parse_with_comments(_masked(text, offset), comment_tokens)
        except UnexpectedInput as error:
            diagnostics.append(_syntax_diagnostic(error, text, path))
            error_at = _error_offset(error, text)
            resume = [
                m.start(1)
                for m in _STATEMENT_START.finditer(text)
                if m.start(1) > offset and m.start(1) >= error_at
            ]
            if not resume:
                break
            offset = resume[0]
            continue
        if diagnostics:
            break
        try:
            items = _ToNodes().transform(tree)
        except RecursionError:
            raise ParseFailure(
                [Diagnostic("TP001", "tests are nested too deeply to read", path, 1, 1,
                            hint="split the test into named predicates")]
            ) from None
        except VisitError as error:
            if isinstance(error.orig_exc, _StringLiteralError):
                token = error.orig_exc.token
                raise ParseFailure(
                    [
                        Diagnostic(
                            "TP002",
                            error.orig_exc.message,
                            path,
                            token.line,
                            token.column,
                            token.end_column,
                            hint='use \\" \\\\ \\n \\t \\r \\/ or \\uXXXX inside strings',
                        )
                    ]
                ) from None
            raise
        return _build_file(items, text, path, comment_tokens, diagnostics)
    raise ParseFailure(diagnostics)


def _parse_with_comments(text: str, sink: list[Token]) -> Tree:
    # A separate parser per call would be slow; Lark's lexer callbacks are fixed at construction,
    # so comments are found by a second, cheap scan of the token stream instead.
    tree = grammar_parser().parse(text)
    sink.extend(_comment_tokens(text))
    return tree


_COMMENT_SCAN = re.compile(r'"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/|#[^\n]*')


def _comment_tokens(text: str) -> list[Token]:
    """Find the `#` comments of a text that parsed, skipping `#` inside strings and regexes."""
    tokens = []
    line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]

    for match in _COMMENT_SCAN.finditer(text):
        if not match.group(0).startswith("#"):
            continue
        start = match.start()
        line = bisect.bisect_right(line_starts, start)
        column = start - line_starts[line - 1] + 1
        token = Token("COMMENT", match.group(0), start_pos=start, line=line, column=column,
                      end_line=line, end_column=column + len(match.group(0)), end_pos=match.end())
        tokens.append(token)
    return tokens


def _build_file(items: list, text: str, path: str, comment_tokens: list[Token], diagnostics) -> n.PolicyFile:
    header = None
    statements = []
    for item in items:
        if isinstance(item, n.Header):
            header = item
        else:
            statements.append(item)
    end_line, end_column = _end_position(text)
    return n.PolicyFile(
        n.Span(1, 1, end_line, end_column),
        path,
        header,
        tuple(statements),
        _collect_comments(text, comment_tokens),
    )
