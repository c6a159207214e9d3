"""Chat templates rendered under a time and a size limit.

A chat template is code from the model folder (Jinja), run once per row: one that loops for hours (two nested
``range(100000)`` loops) or builds a gigabyte string (``{{ 'x' * 300000000 }}``, which transformers renders and
the tokenizer then aborts the process on) must cost one sentence, not the machine. So templates are rendered here
rather than by ``tokenizer.apply_chat_template``, in the same Jinja sandbox with the same settings and helpers
transformers gives them (``ImmutableSandboxedEnvironment`` with trim_blocks/lstrip_blocks and loop controls;
``raise_exception``, ``strftime_now``, the ``tojson`` filter without HTML escaping, ``dict``, an underscore-refusing
``namespace``, the ``{% generation %}`` tag; the tokenizer's special tokens, ``messages``, ``tools``,
``add_generation_prompt``), plus:

* size: ``*`` and ``**`` are checked before they run, and every ``+``, ``~``, filter and call result after, against
  `MAX_TEXT` characters (list items count one each); an integer argument over `MAX_TEXT` is refused before the call
  (a width of 10**9, ``lipsum(10**9)``); the rendered text is cut off at `MAX_OUTPUT` characters as it is produced;
* time: a render running over `SECONDS` is interrupted (SIGALRM in the main thread, where training renders; in
  another thread only the size limits hold).

tests/data/test_chat_template.py checks the output equals ``apply_chat_template``'s on the templates of common model
families, tools included.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEXT = 1 << 25  # characters any value built inside a template may reach (32 MiB of text)
MAX_OUTPUT = 1 << 23  # characters one rendered conversation may reach (8 MiB; rows hold at most 1M characters)
SECONDS = 5.0  # one row's renders (a real template takes milliseconds)


class TemplateLimit(Exception):
    """A template went past a limit: `what` says which, for the one-sentence error."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict, bytes)) else 0


def _check(value: Any) -> Any:
    if _size(value) > MAX_TEXT:
        raise TemplateLimit(f"builds a value of {_size(value):,} characters (over {MAX_TEXT:,})")
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEXT:
            raise TemplateLimit(f"passes the number {a:,} to a call (over {MAX_TEXT:,})")


_BIG_NUMBER = re.compile(rf"\d{{{len(str(MAX_TEXT))},}}")  # a width in a format string as long as MAX_TEXT's


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


def _width(value: Any) -> int:
    return len(value) if isinstance(value, str) else value if isinstance(value, int) else 0


def _growth(name: str, args: tuple, kwargs: dict, method: bool = False) -> int:
    """A bound on the size of what a call that can multiply its input makes, worked out before the call (the str
    methods and filters that insert a piece per line, character or item); 0 for the calls that cannot. For a
    method, args[0] is the str it is called on."""
    first = args[0] if args else None
    text = first if isinstance(first, str) else ""
    if name in ("format", "format_map") or (name == "%" and text):
        return MAX_TEXT + 1 if _BIG_NUMBER.search(text) else 0  # {:>300000000} or %300000000s
    if name == "replace" and len(args) >= 3 and isinstance(args[1], str) and isinstance(args[2], str):
        hits = len(text) + 1 if not args[1] else text.count(args[1])
        return len(text) + hits * max(0, len(args[2]) - len(args[1]))
    if name == "indent":
        return len(text) + (text.count("\n") + 1) * _width(_arg(args, kwargs, 1, "width", 4))
    if name == "expandtabs":
        return len(text) + text.count("\t") * _width(_arg(args, kwargs, 1, "tabsize", 8))
    if name == "wordwrap":
        width = max(1, _width(_arg(args, kwargs, 1, "width", 79)))
        return len(text) + (len(text) // width + 1) * len(_arg(args, kwargs, 3, "wrapstring", None) or "\n")
    if name == "join":
        items, sep = (args[1] if len(args) > 1 else (), text) if method else (first, _arg(args, kwargs, 1, "d", ""))
        return _size(items) * (1 + _width(sep))
    if name == "tojson":
        return _size(first) * _width(_arg(args, kwargs, 2, "indent", None) or 0)
    if name in ("slice", "batch"):  # that many lists (slice) or fill items (batch)
        return 64 * _width(_arg(args, kwargs, 1, "slices" if name == "slice" else "linecount", 0))
    return 0


class _Generator(CodeGenerator):
    """Routes ``a ~ b`` through the environment, which checks the result's size (Jinja has no hook for it)."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Generation(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text for masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # Jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%" and _growth("%", (left,), {}) > MAX_TEXT:
            raise TemplateLimit("formats with a width of many millions of characters")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_TEXT:
                    raise TemplateLimit(f"repeats a value to {_size(seq) * n:,} characters (over {MAX_TEXT:,})")
        if operator == "**" and isinstance(right, int) and abs(right) > 256 and isinstance(left, int) \
                and abs(left) > 1:
            raise TemplateLimit(f"raises a number to the power {right:,}")
        return _check(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's names)
        _check_args(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and _growth(getattr(__obj, "__name__", ""), (owner, *args), kwargs, True) > MAX_TEXT:
            raise TemplateLimit(f"calls {__obj.__name__}() to make a text of over {MAX_TEXT:,} characters")
        return _check(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Jinja hands str.format out wrapped (no __self__ left for `call` to look at): check the format string here
        if isinstance(obj, str) and attribute in ("format", "format_map") and _growth(attribute, (obj,), {}) > MAX_TEXT:
            raise TemplateLimit("formats with a width of many millions of characters")
        return super().getattr(obj, attribute)

    def bounded_concat(self, values: tuple) -> str:
        return _check("".join(map(str, values)))


def _bounded_filter(name: str, f: Any) -> Any:
    @functools.wraps(f)  # keeps Jinja's pass_context/pass_environment marks
    def run(*args: Any, **kwargs: Any) -> Any:
        values = tuple(a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                              jinja2.nodes.EvalContext)))
        _check_args(values[1:], kwargs)  # the filtered value itself may be any number
        if _growth(name, values, kwargs) > MAX_TEXT:
            raise TemplateLimit(f"applies the {name} filter to make a value of over {MAX_TEXT:,} characters")
        return _check(f(*args, **kwargs))

    return run


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping (Jinja's own escapes < > & ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_Namespace)
    return env.from_string(source)


def render_chat(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """The tokenizer's chat template applied to `messages` (and `tools`), as ``apply_chat_template(...,
    tokenize=False)`` gives it, within the limits; raises TemplateLimit or the template's own exception."""
    template = compile_template(tokenizer.get_chat_template(None, tools))
    context = {**tokenizer.special_tokens_map, "messages": messages, "tools": tools, "documents": None,
               "add_generation_prompt": add_generation_prompt}
    out: list[str] = []
    size = 0
    for piece in template.generate(**context):
        size += len(piece)
        if size > MAX_OUTPUT:
            raise TemplateLimit(f"writes more than {MAX_OUTPUT:,} characters for one conversation")
        out.append(piece)
    return "".join(out)


# ------------------------------------------------------------------------------------------------ time limit

_guard = {"on": False}


def _on_alarm(signum: int, frame: Any) -> None:
    raise TemplateLimit(f"ran for more than {SECONDS:g} s on one row")


@contextmanager
def render_guard() -> Iterator[None]:
    """Install the alarm handler once for many renders (a chunk of rows), in the main thread; restore it after."""
    if _guard["on"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    pending = signal.setitimer(signal.ITIMER_REAL, 0)
    _guard["on"] = True
    try:
        yield
    finally:
        _guard["on"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending[0] > 0:  # someone else's timer was running: give it back
            signal.setitimer(signal.ITIMER_REAL, *pending)


@contextmanager
def time_limit(seconds: float | None = None) -> Iterator[None]:
    """Interrupt the renders inside after `seconds` (default SECONDS; main thread only, elsewhere no limit)."""
    with render_guard():
        if not _guard["on"] or threading.current_thread() is not threading.main_thread():
            yield
            return
        signal.setitimer(signal.ITIMER_REAL, seconds or SECONDS)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
