"""The multiplier of a `lambda` schedule: a safe arithmetic expression, or your own f(tick).

`scheduler.lr_lambda='0.5 ** epoch'` is parsed, checked against a short list of allowed nodes and
compiled into closures: nothing is ever eval'd, and every number is a float, so `**` overflows
instead of hanging. `epoch` and `step` count from 0, fractional with `interval: step`.
A dotted path (`mymodule.halving`) names a function instead; see `user_function` for the rule.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import operator
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sweep.validation import fail

Multiplier = Callable[[int], float]
Env = Mapping[str, float]

# name: (function, fewest arguments, most arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, float]] = {
    "exp": (math.exp, 1, 1), "log": (math.log, 1, 1), "sqrt": (math.sqrt, 1, 1),
    "cos": (math.cos, 1, 1), "sin": (math.sin, 1, 1), "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1), "abs": (abs, 1, 1), "min": (min, 2, math.inf),
    "max": (max, 2, math.inf)}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_VARIABLES = ("epoch", "step")
_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Eq: operator.eq,
    ast.NotEq: operator.ne}
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Load)
EXPRESSIONS = ("an expression of epoch and step with numbers, + - * / // % **, comparisons, "
               "`a if cond else b`, pi, e and " + ", ".join(_FUNCTIONS)
               + "; or a dotted path to a function f(tick) of your own")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def multiplier(text: str, key: str, interval: str, steps_per_epoch: int) -> Multiplier:
    """f(tick) for an expression of `epoch` and `step`, or the function a dotted path names."""
    if _DOTTED.fullmatch(text):
        return user_function(text, key)
    run = _compile(parse_expression(text, key))
    per_epoch = 1 if interval == "epoch" else steps_per_epoch  # ticks in one epoch

    def f(tick: int) -> float:
        return run({"epoch": tick / per_epoch, "step": tick * steps_per_epoch / per_epoch})
    return f


def parse_expression(text: str, key: str) -> ast.Expression:
    """Parse an lr multiplier such as `0.5 ** epoch`, arithmetic only; anything else fails."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        fail(key, text, EXPRESSIONS)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in _FUNCTIONS or node.keywords:
                fail(key, text, f"cannot call {ast.unparse(node.func)!r}; give {EXPRESSIONS}")
            _, low, high = _FUNCTIONS[name]
            if not low <= len(node.args) <= high:
                fail(key, text, f"{name} takes {low if low == high else f'{low} or more'} "
                     f"argument{'s' if high > 1 else ''}, not {len(node.args)}")
            continue
        ok = (isinstance(node, _NODES) or type(node) in _OPERATORS
              or (isinstance(node, ast.Constant) and type(node.value) in (int, float))
              or (isinstance(node, ast.Name) and (
                  node.id in _VARIABLES or node.id in _CONSTANTS
                  or (node.id in _FUNCTIONS and id(node) in called))))
        if not ok:
            fail(key, text, f"cannot use {ast.unparse(node)!r}; give {EXPRESSIONS}")
    return tree


def _compile(node: ast.AST) -> Callable[[Env], float]:
    """A checked expression as nested closures over {epoch, step}, every value a float."""
    match node:
        case ast.Expression(body=body):
            return _compile(body)
        case ast.Constant(value=value):
            number = float(value)
            return lambda env: number
        case ast.Name(id=name) if name in _VARIABLES:
            return lambda env: env[name]
        case ast.Name(id=name):
            number = _CONSTANTS[name]
            return lambda env: number
        case ast.BinOp(left=left, op=op, right=right):
            apply, a, b = _OPERATORS[type(op)], _compile(left), _compile(right)
            return lambda env: apply(a(env), b(env))
        case ast.UnaryOp(op=op, operand=operand):
            apply, a = _OPERATORS[type(op)], _compile(operand)
            return lambda env: apply(a(env))
        case ast.Call(func=ast.Name(id=name), args=args):
            function, parts = _FUNCTIONS[name][0], [_compile(a) for a in args]
            return lambda env: float(function(*(p(env) for p in parts)))
        case ast.IfExp(test=test, body=body, orelse=orelse):
            cond, yes, no = _compile(test), _compile(body), _compile(orelse)
            return lambda env: yes(env) if cond(env) else no(env)
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            parts = [_compile(left), *map(_compile, comparators)]
            tests = [_OPERATORS[type(op)] for op in ops]

            def compare(env: Env) -> float:
                values = [p(env) for p in parts]
                return float(all(t(a, b) for t, a, b in zip(tests, values, values[1:],
                                                            strict=False)))
            return compare
    raise AssertionError(f"unchecked node {ast.dump(node)}")  # parse_expression refuses these


def user_function(path: str, key: str) -> Multiplier:
    """The function a dotted path names, if it is a multiplier of your own (the rule below)."""
    # A dotted path runs code, so it must name a multiplier you wrote: a plain Python function
    # (a `def` or a `lambda`) of exactly one parameter, the tick, in a module that is neither in
    # the standard library nor an installed package. Such modules are not even imported, so no
    # path reaches sys.exit, os._exit, input, a file operation or a library function's side
    # effects (torch.manual_seed); builtins, classes, methods, modules and other callable objects
    # are refused before anything is called. The builder then calls the function on every tick
    # of the run before training, and every value must be a finite number >= 0.
    fn = own_function(path, key, "a dotted path names a plain Python function f(tick) in a "
                      "module of your own")
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                                  params[0].POSITIONAL_OR_KEYWORD):
        fail(key, path, f"takes ({', '.join(map(str, params))}); a multiplier f(tick) takes "
             "exactly one parameter")
    return fn


def own_function(path: str, key: str, allowed: str) -> Callable[..., Any]:
    """The plain Python function `path` names, outside the standard library and installed
    packages (which are not imported); anything else fails with `allowed`."""
    top = path.partition(".")[0]
    where = ("the standard library" if top in sys.stdlib_module_names
             else "an installed package" if _installed(top) else None)
    if where:
        fail(key, path, f"{top} is {where}; {allowed}")
    try:
        fn = locate(path)
    except Exception as err:  # importing a module runs it: report whatever it raised
        fail(key, path, f"cannot import it ({one_line(err)}); {allowed}")
    if not inspect.isfunction(fn):
        fail(key, path, f"is a {type(fn).__name__}; {allowed}")
    return fn


def locate(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then its attributes."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and (module + ".").startswith(err.name + "."):
                continue  # not a module: an attribute of a shorter one, or missing
            raise  # a module that exists failed to import one of its own
        for j in range(i, len(parts)):
            if not hasattr(obj, parts[j]):
                raise ImportError(f"{'.'.join(parts[:j])} has no {parts[j]!r}")
            obj = getattr(obj, parts[j])
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def _installed(module: str) -> bool:
    """Whether a top-level module lives in site-packages or the interpreter's own library."""
    try:
        spec = importlib.util.find_spec(module)  # finds it without running it
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    places = [spec.origin or "", *(spec.submodule_search_locations or [])]
    roots = {Path(p).resolve() for name, p in sysconfig.get_paths().items()
             if name in ("stdlib", "platstdlib", "purelib", "platlib")}
    for place in places:
        path = Path(place).resolve()
        if {"site-packages", "dist-packages"} & set(path.parts) or any(
                path.is_relative_to(root) for root in roots):
            return True
    return False


def one_line(err: BaseException) -> str:
    """`TypeName: first line of the message`, for a one-line ConfigError."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
